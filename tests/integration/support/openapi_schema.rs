//! A validator for the part of OpenAPI 3.0 schema language that the Hetzner fixture
//! (`tests/fixtures/hetzner-openapi-subset.json`) uses: `$ref` to `#/components/schemas/…`,
//! `type` with `nullable`, `properties`, `required`, `additionalProperties`, `items`, `enum`,
//! `allOf`, `maximum`, the formats `int32`/`int64`/`double`/`decimal`/`date-time`, and the
//! fixture's three `pattern`s. Anything else in a schema is refused loudly (`panic!`), so that a
//! fixture using more of the language cannot pass unchecked.
//!
//! Why not the `jsonschema` crate: it cost ~35 crates of compile time and, as a dev-dependency,
//! switched on features of shared crates (serde_json's `float_roundtrip` among them), so the
//! test build parsed numbers differently from the daemon and cargo built 30 crates twice.

use serde_json::Value;

/// Keywords that describe without constraining.
const ANNOTATIONS: [&str; 6] = [
    "description",
    "example",
    "title",
    "deprecated",
    "externalDocs",
    "readOnly",
];

/// Errors of `instance` against the component schema `name` of `doc`, as "path: problem".
pub fn errors(doc: &Value, name: &str, instance: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let schema = component(doc, name);
    check(doc, schema, instance, "$", &mut out);
    out
}

fn component<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["components"]["schemas"]
        .get(name)
        .unwrap_or_else(|| panic!("no schema {name:?} in the fixture"))
}

fn check(doc: &Value, schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        panic!("schema at {path} is not an object: {schema}");
    };
    if let Some(r) = s.get("$ref") {
        let name = r
            .as_str()
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
            .unwrap_or_else(|| panic!("unsupported $ref {r}"));
        return check(doc, component(doc, name), v, path, out);
    }
    for key in s.keys() {
        let known = ANNOTATIONS.contains(&key.as_str())
            || [
                "type",
                "nullable",
                "properties",
                "required",
                "additionalProperties",
                "items",
                "enum",
                "allOf",
                "maximum",
                "format",
                "pattern",
            ]
            .contains(&key.as_str());
        assert!(known, "schema keyword {key:?} at {path} is not supported");
    }
    if v.is_null() && s.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            check(doc, sub, v, path, out);
        }
    }
    if let Some(t) = s.get("type").and_then(Value::as_str)
        && !has_type(t, v)
    {
        out.push(format!("{path}: expected {t}, got {v}"));
        return;
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        out.push(format!("{path}: {v} is not one of {allowed:?}"));
    }
    if let (Some(max), Some(n)) = (s.get("maximum").and_then(Value::as_f64), v.as_f64())
        && n > max
    {
        out.push(format!("{path}: {n} is above the maximum {max}"));
    }
    if let Some(f) = s.get("format").and_then(Value::as_str) {
        check_format(f, v, path, out);
    }
    if let (Some(p), Some(text)) = (s.get("pattern").and_then(Value::as_str), v.as_str())
        && !matches_pattern(p, text)
    {
        out.push(format!("{path}: {text:?} does not match {p}"));
    }
    if let Some(items) = s.get("items")
        && let Some(list) = v.as_array()
    {
        for (i, item) in list.iter().enumerate() {
            check(doc, items, item, &format!("{path}[{i}]"), out);
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for req in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = req.as_str().expect("required names are strings");
            if !obj.contains_key(req) {
                out.push(format!("{path}: missing required {req:?}"));
            }
        }
        for (k, val) in obj {
            let sub = format!("{path}.{k}");
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(p), _) => check(doc, p, val, &sub, out),
                (None, Some(Value::Bool(false))) => {
                    out.push(format!("{path}: unexpected property {k:?}"))
                }
                (None, Some(extra @ Value::Object(_))) => check(doc, extra, val, &sub, out),
                (None, _) => {}
            }
        }
    }
}

fn has_type(t: &str, v: &Value) -> bool {
    match t {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        other => panic!("unsupported type {other:?}"),
    }
}

fn check_format(f: &str, v: &Value, path: &str, out: &mut Vec<String>) {
    let ok = match f {
        "int64" => !v.is_number() || v.is_i64() || v.is_u64(),
        "int32" => !v.is_number() || v.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        // Hetzner sends prices as decimal strings and coordinates as numbers.
        "double" => !v.is_string(),
        "decimal" => v.as_str().is_none_or(|s| s.parse::<f64>().is_ok()),
        "date-time" => v
            .as_str()
            .is_none_or(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        other => panic!("unsupported format {other:?} at {path}"),
    };
    if !ok {
        out.push(format!("{path}: {v} is not a valid {f}"));
    }
}

/// The fixture's patterns, written out by hand (each refuses what its regular expression does).
fn matches_pattern(p: &str, s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    match p {
        // A label value: empty, or 1–63 characters of [a-zA-Z0-9._-] that start and end
        // alphanumeric.
        r"^(()|[a-z0-9A-Z]|([a-z0-9A-Z][a-z0-9A-Z\._-]{0,61}[a-z0-9A-Z]))$" => {
            s.is_empty()
                || (s.len() <= 63
                    && s.starts_with(alnum)
                    && s.ends_with(alnum)
                    && s.chars().all(|c| alnum(c) || "._-".contains(c)))
        }
        // A location or network zone name: lowercase alphanumeric words joined by single
        // dashes, starting with a word (a trailing dash is allowed by the expression).
        r"^[a-z0-9]+(-?[a-z0-9]*)*$" => {
            let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
            s.starts_with(lower) && s.chars().all(|c| lower(c) || c == '-') && !s.contains("--")
        }
        other => panic!("pattern {other:?} is not supported by the test validator"),
    }
}

#[cfg(test)]
mod tests {
    use super::matches_pattern;

    #[test]
    fn the_patterns_refuse_what_their_expressions_refuse() {
        let label = r"^(()|[a-z0-9A-Z]|([a-z0-9A-Z][a-z0-9A-Z\._-]{0,61}[a-z0-9A-Z]))$";
        for ok in ["", "a", "prod", "job-1.x_y", &"a".repeat(63)] {
            assert!(matches_pattern(label, ok), "{ok:?}");
        }
        for bad in ["-a", "a-", "a b", "ä", &"a".repeat(64), "a/b"] {
            assert!(!matches_pattern(label, bad), "{bad:?}");
        }
        let name = r"^[a-z0-9]+(-?[a-z0-9]*)*$";
        for ok in ["fsn1", "eu-central", "us-east-1", "a-"] {
            assert!(matches_pattern(name, ok), "{ok:?}");
        }
        for bad in ["", "-a", "EU", "a--b", "a_b"] {
            assert!(!matches_pattern(name, bad), "{bad:?}");
        }
    }
}
