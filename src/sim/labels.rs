//! Hetzner label selectors, as the simulator evaluates them.
//!
//! Owns parsing and matching of `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (..)`, `k notin (..)`,
//! with commas meaning AND (commas inside parentheses belong to the set), and the rules for
//! label keys and values on create. Written from the API's documentation, not shared with the
//! client: the simulator judges requests by its own rules. Must not panic on any input: a
//! malformed selector or label is an `invalid_input` error for the caller to send.

use std::collections::BTreeMap;

/// The documented value pattern `^[a-z0-9A-Z]([a-z0-9A-Z\._-]{0,61}[a-z0-9A-Z])?$`, or empty.
pub fn label_value_ok(v: &str) -> bool {
    v.is_empty() || label_name_ok(v)
}

fn label_name_ok(v: &str) -> bool {
    let chars: Vec<char> = v.chars().collect();
    let edge = |c: &char| c.is_ascii_alphanumeric();
    let inner = |c: &char| c.is_ascii_alphanumeric() || "._-".contains(*c);
    !chars.is_empty()
        && chars.len() <= 63
        && chars.first().is_some_and(edge)
        && chars.last().is_some_and(edge)
        && chars.iter().all(inner)
}

/// A key is `[prefix/]name`: the prefix a DNS subdomain outside `hetzner.cloud`, the name as a
/// value but not empty.
pub fn label_key_ok(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rfind('/') {
        Some(i) => (Some(&k[..i]), &k[i + 1..]),
        None => (None, k),
    };
    if let Some(prefix) = prefix {
        let dns_ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !dns_ok {
            return Err(format!("label key '{k}' has an invalid prefix"));
        }
        if prefix == "hetzner.cloud" || prefix.ends_with(".hetzner.cloud") {
            return Err(format!(
                "label key '{k}': the hetzner.cloud/ prefix is reserved"
            ));
        }
    }
    if !label_name_ok(name) {
        return Err(format!("label key '{k}' is invalid"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Has(String),
    HasNot(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Selector(Vec<Term>);

impl Selector {
    pub fn parse(input: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for raw in split_top_level(input)? {
            let t = raw.trim();
            if t.is_empty() {
                return Err(format!("empty term in label selector {input:?}"));
            }
            terms.push(parse_term(t).ok_or_else(|| format!("invalid label selector term {t:?}"))?);
        }
        Ok(Selector(terms))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            // Kubernetes semantics, which Hetzner follows: a missing key satisfies `!=`.
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Has(k) => labels.contains_key(k),
            Term::HasNot(k) => !labels.contains_key(k),
            Term::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        })
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("unbalanced parentheses in label selector {s:?}"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parentheses in label selector {s:?}"));
    }
    out.push(&s[start..]);
    Ok(out)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_term(t: &str) -> Option<Term> {
    if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        return valid_key(k).then(|| Term::HasNot(k.to_owned()));
    }
    if let Some((k, v)) = t.split_once("!=") {
        return kv(k, v).map(|(k, v)| Term::Ne(k, v));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return kv(k, v).map(|(k, v)| Term::Eq(k, v));
    }
    if let Some(open) = t.find('(') {
        let set = t[open..].strip_prefix('(')?.strip_suffix(')')?;
        let values: Vec<String> = set.split(',').map(|v| v.trim().to_owned()).collect();
        if !values.iter().all(|v| valid_value(v)) {
            return None;
        }
        let head = t[..open].trim();
        let (k, op) = head.rsplit_once(char::is_whitespace)?;
        let k = k.trim();
        if !valid_key(k) {
            return None;
        }
        return match op {
            "in" => Some(Term::In(k.to_owned(), values)),
            "notin" => Some(Term::NotIn(k.to_owned(), values)),
            _ => None,
        };
    }
    valid_key(t).then(|| Term::Has(t.to_owned()))
}

fn kv(k: &str, v: &str) -> Option<(String, String)> {
    let (k, v) = (k.trim(), v.trim());
    (valid_key(k) && valid_value(v)).then(|| (k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_operator_matches_as_documented() {
        let l = labels(&[
            ("env", "prod"),
            ("type", "web"),
            ("managed-by", "provisiond"),
        ]);
        let yes = [
            "env=prod",
            "env==prod",
            "env!=dev",
            "missing!=x",
            "env",
            "!missing",
            "env in (dev,prod)",
            "env notin (dev, test)",
            "missing notin (a)",
            "env=prod,type!=database,managed-by",
            " env = prod ",
        ];
        let no = [
            "env=dev",
            "env!=prod",
            "missing",
            "!env",
            "env in (dev,test)",
            "env notin (prod)",
            "missing in (a)",
            "env=prod,type=db",
        ];
        for s in yes {
            assert!(Selector::parse(s).unwrap().matches(&l), "{s} should match");
        }
        for s in no {
            assert!(
                !Selector::parse(s).unwrap().matches(&l),
                "{s} should not match"
            );
        }
    }

    /// The documented key and value rules, table by table (not the client's tests: the
    /// simulator must judge on its own).
    #[test]
    fn label_keys_and_values_follow_the_documented_rules() {
        let values = [
            ("", true),
            ("a", true),
            ("prod", true),
            ("a.b_c-d", true),
            (&"x".repeat(63), true),
            (&"x".repeat(64), false),
            ("-a", false),
            ("a-", false),
            ("a:b", false),
            ("a b", false),
            (
                "cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY",
                false,
            ),
        ];
        for (v, ok) in values {
            assert_eq!(label_value_ok(v), ok, "value {v:?}");
        }
        let keys = [
            ("environment", true),
            ("just-a-key", true),
            ("example.com/my", true),
            ("a.b-c.example/x_y", true),
            ("", false),
            ("/name", false),
            ("Example.com/my", false),
            ("example.com/", false),
            ("-bad.example/x", false),
            ("hetzner.cloud/x", false),
            ("sub.hetzner.cloud/x", false),
            (&format!("{}/x", "a".repeat(254)), false),
            (&"k".repeat(64), false),
        ];
        for (k, ok) in keys {
            assert_eq!(label_key_ok(k).is_ok(), ok, "key {k:?}");
        }
    }

    #[test]
    fn malformed_selectors_are_errors_not_panics() {
        for s in [
            "",
            "a=b,",
            "env in (a",
            "env in a)",
            "env ~ (a)",
            "k=v:w",
            "(",
            ")",
            "=v",
            "é=1",
        ] {
            assert!(Selector::parse(s).is_err(), "{s:?} should be rejected");
        }
    }
}
