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
    validate_at(value, schema, root, path, 0)
}

/// How deep `validate` follows schemas (`$ref`s, combinators, and the value's own nesting)
/// before it gives up: a `$ref` cycle such as `{"$ref": "#"}` must be an error, not a stack
/// overflow.
const MAX_DEPTH: usize = 64;

fn validate_at(
    value: &Value,
    schema: &Value,
    root: &Value,
    path: &str,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{}: schema too deep or cyclic", label(path)));
    }
    let validate = |value: &Value, schema: &Value, root: &Value, path: &str| {
        validate_at(value, schema, root, path, depth + 1)
    };
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
/// Checks a schema itself (one a task program declares), once, before any value meets it:
/// every `$ref` resolves, and no chain of `$ref`s and `allOf`/`anyOf`/`oneOf` leads back to
/// where it started without descending into the value (`{"$ref": "#"}`), which no value could
/// ever get through. Recursion through `properties` or `items` (a tree) is fine.
pub fn check(root: &Value) -> Result<(), String> {
    use std::collections::HashSet;
    /// The schemas reachable from `s`, by any keyword.
    fn children<'a>(s: &'a Value, root: &'a Value) -> Result<Vec<&'a Value>, String> {
        let Some(obj) = s.as_object() else {
            return Ok(Vec::new());
        };
        let mut out = same_value(s, root)?;
        for key in ["properties", "patternProperties"] {
            if let Some(Value::Object(map)) = obj.get(key) {
                out.extend(map.values());
            }
        }
        for key in ["items", "additionalProperties", "not"] {
            if let Some(s) = obj.get(key) {
                out.push(s);
            }
        }
        Ok(out)
    }
    /// The schemas `s` applies to the same value: its `$ref` and combinators.
    fn same_value<'a>(s: &'a Value, root: &'a Value) -> Result<Vec<&'a Value>, String> {
        let Some(obj) = s.as_object() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        if let Some(Value::String(r)) = obj.get("$ref") {
            out.push(resolve(root, r).ok_or_else(|| format!("schema error: bad $ref {r}"))?);
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            if let Some(Value::Array(list)) = obj.get(key) {
                out.extend(list);
            }
        }
        Ok(out)
    }
    /// Depth-first along same-value edges; `ok` holds the schemas known to end.
    fn acyclic<'a>(
        s: &'a Value,
        root: &'a Value,
        stack: &mut Vec<*const Value>,
        ok: &mut HashSet<*const Value>,
    ) -> Result<(), String> {
        let me = s as *const Value;
        if ok.contains(&me) {
            return Ok(());
        }
        if stack.contains(&me) || stack.len() > MAX_DEPTH {
            return Err("schema too deep or cyclic".to_string());
        }
        stack.push(me);
        for next in same_value(s, root)? {
            acyclic(next, root, stack, ok)?;
        }
        stack.pop();
        ok.insert(me);
        Ok(())
    }
    let mut seen: HashSet<*const Value> = HashSet::new();
    let mut ok = HashSet::new();
    let mut todo = vec![root];
    while let Some(s) = todo.pop() {
        if !seen.insert(s as *const Value) {
            continue;
        }
        acyclic(s, root, &mut Vec::new(), &mut ok)?;
        todo.extend(children(s, root)?);
    }
    Ok(())
}

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

    /// Broke: `{"$ref": "#"}` recursed until the stack overflowed, aborting the server.
    #[test]
    fn a_ref_cycle_is_an_error_not_a_stack_overflow() {
        for s in [
            json!({"$ref": "#"}),
            json!({"allOf": [{"$ref": "#/defs/a"}], "defs": {"a": {"anyOf": [{"$ref": "#"}]}}}),
            json!({"type": "object", "properties": {"x": {"$ref": "#/properties/x"}}}),
        ] {
            assert!(
                super::check(&s).unwrap_err().contains("too deep or cyclic"),
                "{s}"
            );
        }
        let e = check(json!({}), json!({"$ref": "#"})).unwrap_err();
        assert_eq!(e, "args: schema too deep or cyclic");
        let e = check(
            json!({"x": {}}),
            json!({"properties": {"x": {"$ref": "#/properties/x"}}}),
        )
        .unwrap_err();
        assert!(e.contains("too deep or cyclic"), "{e}");
        // A tree is recursive through its items: fine, to a point.
        let tree = json!({"type": "array", "items": {"$ref": "#"}});
        assert!(super::check(&tree).is_ok());
        assert!(check(json!([[[]], []]), tree.clone()).is_ok());
        let mut deep = json!([]);
        for _ in 0..100 {
            deep = json!([deep]);
        }
        assert!(check(deep, tree).unwrap_err().contains("too deep"));
        assert!(super::check(&json!({"$ref": "#/nowhere"}))
            .unwrap_err()
            .contains("bad $ref"));
    }

    #[test]
    fn refs_and_nullable_types() {
        let root = json!({"defs": {"x": {"type": ["string", "null"]}}});
        let s = json!({"$ref": "#/defs/x"});
        assert!(validate(&Value::Null, &s, &root, "v").is_ok());
        assert!(validate(&json!(1), &s, &root, "v").is_err());
    }
}
