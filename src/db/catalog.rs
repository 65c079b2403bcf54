//! A description of the schema as text lines, one per object (type, table, column, constraint,
//! index, trigger, function), for `migrate --dry-run`'s plan (the lines a run would add, change
//! or remove) and for tests that compare schemas. Read-only: one query, no writes.
//!
//! Only the schema the daemon's unqualified names resolve to (`current_schema()`) is described;
//! internal triggers (those behind foreign keys) and the indexes behind constraints are left out,
//! since their constraint's line already says what they are.

use diesel::QueryableByName;
use diesel::sql_types::Text;
use std::collections::BTreeMap;

/// One line per object, sorted. Each line starts with its kind and a name that identifies it
/// (`column provisioning_jobs.executor …`), so two snapshots can be compared by that key.
pub const SNAPSHOT_SQL: &str = r#"
WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = current_schema()),
rels AS (
    SELECT c.oid, c.relname FROM pg_class c
    WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relkind IN ('r', 'p')
)
SELECT line FROM (
    SELECT 'type ' || t.typname || ' enum ('
           || string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) || ')' AS line
    FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
    WHERE t.typnamespace = (SELECT oid FROM ns)
    GROUP BY t.typname
  UNION ALL
    SELECT 'table ' || r.relname FROM rels r
  UNION ALL
    SELECT 'column ' || r.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
    FROM rels r
    JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  UNION ALL
    SELECT 'constraint ' || r.relname || '.' || con.conname || ' ' || pg_get_constraintdef(con.oid)
           || CASE WHEN con.convalidated THEN '' ELSE ' (not valid)' END
    FROM rels r JOIN pg_constraint con ON con.conrelid = r.oid
  UNION ALL
    SELECT 'index ' || r.relname || '.' || i.relname || ' ' || pg_get_indexdef(x.indexrelid)
           || CASE WHEN x.indisvalid THEN '' ELSE ' (INVALID)' END
    FROM rels r
    JOIN pg_index x ON x.indrelid = r.oid
    JOIN pg_class i ON i.oid = x.indexrelid
    WHERE NOT EXISTS (SELECT 1 FROM pg_constraint k
                      WHERE k.conindid = x.indexrelid AND k.contype IN ('p', 'u', 'x'))
  UNION ALL
    SELECT 'trigger ' || r.relname || '.' || tg.tgname || ' ' || pg_get_triggerdef(tg.oid)
    FROM rels r JOIN pg_trigger tg ON tg.tgrelid = r.oid
    WHERE NOT tg.tgisinternal
  UNION ALL
    SELECT 'function ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') '
           || 'body md5 ' || md5(pg_get_functiondef(p.oid))
    FROM pg_proc p
    WHERE p.pronamespace = (SELECT oid FROM ns) AND p.prokind IN ('f', 'p')
) AS s
ORDER BY line"#;

#[derive(QueryableByName)]
pub struct Line {
    #[diesel(sql_type = Text)]
    pub line: String,
}

/// The identifying part of a line: its kind and name (`column agents.status`).
pub fn key(line: &str) -> &str {
    let mut ends = line.match_indices(' ').map(|(i, _)| i);
    let _kind = ends.next();
    match ends.next() {
        Some(end) => &line[..end],
        None => line,
    }
}

/// What going from `before` to `after` adds, changes and removes, as lines for a person.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    /// (before, after)
    pub changed: Vec<(String, String)>,
    pub removed: Vec<String>,
}

impl Diff {
    pub fn between(before: &[String], after: &[String]) -> Diff {
        let index = |lines: &[String]| -> BTreeMap<String, String> {
            lines
                .iter()
                .map(|l| (key(l).to_owned(), l.clone()))
                .collect()
        };
        let (b, a) = (index(before), index(after));
        let mut diff = Diff::default();
        for (k, line) in &a {
            match b.get(k) {
                None => diff.added.push(line.clone()),
                Some(old) if old != line => diff.changed.push((old.clone(), line.clone())),
                Some(_) => {}
            }
        }
        diff.removed = b
            .iter()
            .filter(|(k, _)| !a.contains_key(*k))
            .map(|(_, l)| l.clone())
            .collect();
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_keyed_by_kind_and_name() {
        assert_eq!(
            key("column agents.status text not null default 'draft'::text"),
            "column agents.status"
        );
        assert_eq!(key("table agents"), "table agents");
    }

    #[test]
    fn diff_sorts_lines_into_added_changed_removed() {
        let before = vec![
            "table a".to_owned(),
            "column a.x integer".to_owned(),
            "column a.gone text".to_owned(),
        ];
        let after = vec![
            "table a".to_owned(),
            "column a.x bigint".to_owned(),
            "column a.y text".to_owned(),
        ];
        let d = Diff::between(&before, &after);
        assert_eq!(d.added, vec!["column a.y text"]);
        assert_eq!(
            d.changed,
            vec![(
                "column a.x integer".to_owned(),
                "column a.x bigint".to_owned()
            )]
        );
        assert_eq!(d.removed, vec!["column a.gone text"]);
        assert!(Diff::between(&after, &after).is_empty());
    }
}
