//! The reaper: deletes servers labelled `managed-by=provisiond` and tagged tailnet devices that
//! no live job owns, once they are older than the grace period. It is what makes "nothing is
//! billed without an owner for longer than one reaper interval" hold after crashes mid-rollback,
//! jobs failed by the sweep, and manual mistakes. It survives errors: one failed delete or
//! listing is logged and the pass goes on.
