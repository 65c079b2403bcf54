//! The HTTP surface (issue #5).
