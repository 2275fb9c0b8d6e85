//! A small JSON Schema validator: the subset the task catalogue and `openapi.yaml` use.
//!
//! Supported keywords: `type` (a name or a list of names), `enum`, `const`, `properties`,
//! `required`, `additionalProperties` (bool or schema), `items`, `minItems`, `maxItems`,
//! `minimum`, `maximum`, `minLength`, `maxLength`, `oneOf`, `anyOf`, `allOf`, `nullable`
//! (OpenAPI 3.0 style) and `$ref` to `#/...` within a root document. Unknown keywords are
//! ignored, as JSON Schema says. Errors name the path of the offending value, so a 422 can
//! tell the caller exactly what to change.

use serde_json::Value;

/// Checks `value` against `schema`. `root` resolves `$ref`s (pass the schema itself when it has
/// none). Returns the first problem found, as `"args.n: must be at most 10000000000"`.
pub fn validate(value: &Value, schema: &Value, root: &Value, path: &str) -> Result<(), String> {
    let Some(obj) = schema.as_object() else {
        // `true` accepts everything, `false` nothing.
        return match schema {
            Value::Bool(false) => Err(format!("{}: is not allowed here", label(path))),
            _ => Ok(()),
        };
    };
    if let Some(Value::String(r)) = obj.get("$ref") {
        let target = resolve(root, r).ok_or_else(|| format!("schema error: bad $ref {r}"))?;
        return validate(value, target, root, path);
    }
    if value.is_null() && obj.get("nullable") == Some(&Value::Bool(true)) {
        return Ok(());
    }
    if let Some(t) = obj.get("type") {
        let ok = match t {
            Value::String(name) => type_matches(value, name),
            Value::Array(names) => names
                .iter()
                .any(|n| n.as_str().is_some_and(|n| type_matches(value, n))),
            _ => true,
        };
        if !ok {
            return Err(format!(
                "{}: must be {}, not {}",
                label(path),
                describe_type(t),
                type_name(value)
            ));
        }
    }
    if let Some(Value::Array(options)) = obj.get("enum") {
        if !options.contains(value) {
            let list: Vec<String> = options.iter().map(|o| o.to_string()).collect();
            return Err(format!(
                "{}: must be one of {}",
                label(path),
                list.join(", ")
            ));
        }
    }
    if let Some(c) = obj.get("const") {
        if c != value {
            return Err(format!("{}: must be {c}", label(path)));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = obj.get("minimum").and_then(Value::as_f64) {
            if n < min {
                return Err(format!("{}: must be at least {}", label(path), num(min)));
            }
        }
        if let Some(max) = obj.get("maximum").and_then(Value::as_f64) {
            if n > max {
                return Err(format!("{}: must be at most {}", label(path), num(max)));
            }
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = obj.get("minLength").and_then(Value::as_u64) {
            if len < min {
                return Err(format!(
                    "{}: must be at least {min} characters long",
                    label(path)
                ));
            }
        }
        if let Some(max) = obj.get("maxLength").and_then(Value::as_u64) {
            if len > max {
                return Err(format!(
                    "{}: must be at most {max} characters long",
                    label(path)
                ));
            }
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(min) = obj.get("minItems").and_then(Value::as_u64) {
            if (items.len() as u64) < min {
                return Err(format!("{}: needs at least {min} items", label(path)));
            }
        }
        if let Some(max) = obj.get("maxItems").and_then(Value::as_u64) {
            if items.len() as u64 > max {
                return Err(format!("{}: takes at most {max} items", label(path)));
            }
        }
        if let Some(item_schema) = obj.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item, item_schema, root, &format!("{}[{i}]", label(path)))?;
            }
        }
    }
    if let Some(map) = value.as_object() {
        let props = obj.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(required)) = obj.get("required") {
            for name in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(name) {
                    return Err(format!("{}: `{name}` is required", label(path)));
                }
            }
        }
        for (key, v) in map {
            let child = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match props.and_then(|p| p.get(key)) {
                Some(s) => validate(v, s, root, &child)?,
                None => match obj.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        let known: Vec<&str> = props
                            .map(|p| p.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        return Err(format!(
                            "{}: unknown field `{key}` (known fields: {})",
                            label(path),
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ));
                    }
                    Some(s @ Value::Object(_)) => validate(v, s, root, &child)?,
                    _ => {}
                },
            }
        }
    }
    if let Some(Value::Array(all)) = obj.get("allOf") {
        for s in all {
            validate(value, s, root, path)?;
        }
    }
    if let Some(Value::Array(any)) = obj.get("anyOf") {
        let errors: Vec<String> = any
            .iter()
            .filter_map(|s| validate(value, s, root, path).err())
            .collect();
        if errors.len() == any.len() {
            return Err(errors.join("; or "));
        }
    }
    if let Some(Value::Array(one)) = obj.get("oneOf") {
        let passing = one
            .iter()
            .filter(|s| validate(value, s, root, path).is_ok())
            .count();
        if passing != 1 {
            return Err(format!(
                "{}: must match exactly one of {} schemas, matches {passing}",
                label(path),
                one.len()
            ));
        }
    }
    Ok(())
}

/// Follows a local JSON pointer such as `#/components/schemas/Job`.
pub fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    root.pointer(pointer)
}

/// How a path is named in a message: the root has no name of its own.
fn label(path: &str) -> &str {
    if path.is_empty() {
        "body"
    } else {
        path
    }
}

fn type_matches(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        _ => true,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn describe_type(t: &Value) -> String {
    let article = |n: &str| match n {
        "integer" | "object" | "array" => format!("an {n}"),
        "null" => "null".to_string(),
        _ => format!("a {n}"),
    };
    match t {
        Value::String(n) => article(n),
        Value::Array(ns) => ns
            .iter()
            .filter_map(Value::as_str)
            .map(article)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "valid".to_string(),
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e18 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value, s: Value) -> Result<(), String> {
        validate(&v, &s, &s, "args")
    }

    #[test]
    fn names_the_path_and_the_limit() {
        let s = json!({"type": "object", "properties": {"n": {"type": "integer", "maximum": 10}},
                       "required": ["n"], "additionalProperties": false});
        assert_eq!(
            check(json!({"n": 11}), s.clone()).unwrap_err(),
            "args.n: must be at most 10"
        );
        assert_eq!(
            check(json!({}), s.clone()).unwrap_err(),
            "args: `n` is required"
        );
        assert!(check(json!({"n": 1, "x": 2}), s.clone())
            .unwrap_err()
            .contains("unknown field `x`"));
        assert_eq!(
            check(json!({"n": "1"}), s.clone()).unwrap_err(),
            "args.n: must be an integer, not a string"
        );
        assert!(check(json!({"n": 3}), s).is_ok());
    }

    #[test]
    fn refs_and_nullable_types() {
        let root = json!({"defs": {"x": {"type": ["string", "null"]}}});
        let s = json!({"$ref": "#/defs/x"});
        assert!(validate(&Value::Null, &s, &root, "v").is_ok());
        assert!(validate(&json!(1), &s, &root, "v").is_err());
    }
}
