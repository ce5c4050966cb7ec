//! The download selection filters of `networkcache-download`, with the reference
//! client's semantics (`NetworkcacheFilter`): each `KEY<op>JSON` criterion is applied in
//! order; entries without KEY are dropped first; comparisons follow Python's rules
//! (numbers compare across int/float/bool, strings by code point, lists
//! lexicographically, anything else unordered, which excludes the entry). `<<` and `>>`
//! keep the entries holding the lowest / highest value that is below / above VALUE.

use serde_json::{Map, Value};
use std::cmp::Ordering;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Le,
    Ge,
    Lt,
    Gt,
    Lowest,
    Highest,
}

/// A filter value: JSON as Python's `json.loads` reads it (so `Infinity`, `-Infinity`
/// and `NaN` are numbers).
#[derive(Debug, Clone)]
pub enum PyValue {
    None,
    Num(f64),
    Str(String),
    List(Vec<PyValue>),
    Dict,
}

/// One `KEY<op>VALUE` criterion.
#[derive(Debug, Clone)]
pub struct Criterion {
    pub key: String,
    pub op: Op,
    pub value: PyValue,
    text: String,
}

/// A criterion that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("could not parse criterion {0:?}: missing or invalid separator (use ==, <=, >=, <, >, << or >>)")]
    NoOperator(String),
    #[error("could not parse criterion {0:?}: the value is not JSON ({1}); quote strings, e.g. key==\"text\"")]
    BadValue(String, String),
}

impl Criterion {
    /// Parses `KEY<op>VALUE`, splitting at the first operator as the reference client's
    /// regular expression `(<<|>>|[<>]=?|==)` does.
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        // Operators are ASCII: only character boundaries can start one.
        for (i, _) in text.char_indices() {
            let rest = &text[i..];
            let found = [
                ("<<", Op::Lowest),
                (">>", Op::Highest),
                ("<=", Op::Le),
                ("<", Op::Lt),
                (">=", Op::Ge),
                (">", Op::Gt),
                ("==", Op::Eq),
            ]
            .into_iter()
            .find(|(s, _)| rest.starts_with(s));
            if let Some((sym, op)) = found {
                let raw = &rest[sym.len()..];
                let value =
                    parse_py_json(raw).map_err(|e| FilterError::BadValue(text.to_string(), e))?;
                return Ok(Criterion {
                    key: text[..i].to_string(),
                    op,
                    value,
                    text: text.to_string(),
                });
            }
        }
        Err(FilterError::NoOperator(text.to_string()))
    }

    /// The criterion as the user wrote it.
    pub fn text(&self) -> &str {
        &self.text
    }
}

fn parse_py_json(raw: &str) -> Result<PyValue, String> {
    match raw.trim() {
        "Infinity" => return Ok(PyValue::Num(f64::INFINITY)),
        "-Infinity" => return Ok(PyValue::Num(f64::NEG_INFINITY)),
        "NaN" => return Ok(PyValue::Num(f64::NAN)),
        _ => {}
    }
    let v: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    Ok(PyValue::from_json(&v))
}

impl PyValue {
    pub fn from_json(v: &Value) -> Self {
        match v {
            Value::Null => PyValue::None,
            Value::Bool(b) => PyValue::Num(if *b { 1.0 } else { 0.0 }),
            Value::Number(n) => PyValue::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => PyValue::Str(s.clone()),
            Value::Array(a) => PyValue::List(a.iter().map(PyValue::from_json).collect()),
            Value::Object(_) => PyValue::Dict,
        }
    }
}

/// Python `==` (never fails; different kinds are unequal). Dicts are compared by the
/// caller on the JSON values, so two `Dict`s here count as unequal.
fn py_eq(a: &PyValue, b: &PyValue) -> bool {
    match (a, b) {
        (PyValue::None, PyValue::None) => true,
        (PyValue::Num(x), PyValue::Num(y)) => x == y,
        (PyValue::Str(x), PyValue::Str(y)) => x == y,
        (PyValue::List(x), PyValue::List(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        _ => false,
    }
}

/// Python ordering; `None` where Python raises `TypeError`. NaN compares false both ways,
/// which `partial_cmp` expresses as `None` as well; callers treat both as "no".
fn py_cmp(a: &PyValue, b: &PyValue) -> Option<Ordering> {
    match (a, b) {
        (PyValue::Num(x), PyValue::Num(y)) => x.partial_cmp(y),
        (PyValue::Str(x), PyValue::Str(y)) => Some(x.cmp(y)),
        (PyValue::List(x), PyValue::List(y)) => {
            for (p, q) in x.iter().zip(y) {
                if !py_eq(p, q) {
                    return py_cmp(p, q);
                }
            }
            Some(x.len().cmp(&y.len()))
        }
        _ => None,
    }
}

fn holds(op: Op, a: &PyValue, b: &PyValue) -> bool {
    match op {
        Op::Eq => py_eq(a, b),
        Op::Le => matches!(py_cmp(a, b), Some(Ordering::Less | Ordering::Equal)),
        Op::Ge => matches!(py_cmp(a, b), Some(Ordering::Greater | Ordering::Equal)),
        Op::Lt | Op::Lowest => py_cmp(a, b) == Some(Ordering::Less),
        Op::Gt | Op::Highest => py_cmp(a, b) == Some(Ordering::Greater),
    }
}

fn field_eq(a: &Value, b: &PyValue, a_py: &PyValue) -> bool {
    match (a, b) {
        (Value::Object(_), PyValue::Dict) => false,
        _ => py_eq(a_py, b),
    }
}

/// Applies the criteria in order, as `NetworkcacheFilter.__call__` does.
pub fn apply<'a>(
    criteria: &[Criterion],
    mut entries: Vec<&'a Map<String, Value>>,
) -> Vec<&'a Map<String, Value>> {
    for c in criteria {
        entries.retain(|e| e.contains_key(&c.key));
        if entries.is_empty() {
            break;
        }
        match c.op {
            Op::Lowest | Op::Highest => {
                let mut value = c.value.clone();
                let mut kept: Vec<&Map<String, Value>> = Vec::new();
                for e in entries {
                    let field = &e[&c.key];
                    let field_py = PyValue::from_json(field);
                    if holds(c.op, &field_py, &value) {
                        kept = vec![e];
                        value = field_py;
                    } else if !kept.is_empty() && field_eq(field, &value, &field_py) {
                        kept.push(e);
                    }
                }
                entries = kept;
            }
            op => entries.retain(|e| holds(op, &PyValue::from_json(&e[&c.key]), &c.value)),
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn maps(v: Value) -> Vec<Map<String, Value>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_object().unwrap().clone())
            .collect()
    }

    fn run(criteria: &[&str], entries: &[Map<String, Value>]) -> Vec<Value> {
        let cs: Vec<Criterion> = criteria
            .iter()
            .map(|c| Criterion::parse(c).unwrap())
            .collect();
        apply(&cs, entries.iter().collect())
            .into_iter()
            .map(|m| m.get("id").cloned().unwrap_or(Value::Null))
            .collect()
    }

    #[test]
    fn parse_splits_at_first_operator() {
        let c = Criterion::parse("x>=\"a<b\"").unwrap();
        assert_eq!((c.key.as_str(), c.op), ("x", Op::Ge));
        assert!(matches!(c.value, PyValue::Str(ref s) if s == "a<b"));
        let c = Criterion::parse("k<<[1]").unwrap();
        assert_eq!((c.key.as_str(), c.op), ("k", Op::Lowest));
        let c = Criterion::parse("k<1").unwrap();
        assert_eq!(c.op, Op::Lt);
        // `a==b<3` splits at `==`, and `b<3` is not JSON.
        assert!(matches!(
            Criterion::parse("a==b<3"),
            Err(FilterError::BadValue(..))
        ));
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!(matches!(
            Criterion::parse("novalue"),
            Err(FilterError::NoOperator(_))
        ));
        assert!(matches!(
            Criterion::parse("os==linux"),
            Err(FilterError::BadValue(..))
        ));
        assert!(Criterion::parse("os==\"linux\"").is_ok());
        assert!(Criterion::parse("v<<Infinity").is_ok());
        // Non-ASCII keys and values (found by fuzzing: slicing inside a character).
        let c = Criterion::parse("clé==\"été\"").unwrap();
        assert_eq!((c.key.as_str(), c.op), ("clé", Op::Eq));
        assert!(matches!(
            Criterion::parse("é"),
            Err(FilterError::NoOperator(_))
        ));
    }

    #[test]
    fn comparisons_follow_python() {
        let e = maps(json!([
            {"id": 1, "v": 3}, {"id": 2, "v": 2.5}, {"id": 3, "v": "x"},
            {"id": 4, "v": [4, 2]}, {"id": 5, "v": true}, {"id": 6}
        ]));
        assert_eq!(run(&["v>2"], &e), vec![json!(1), json!(2)]);
        assert_eq!(run(&["v==1"], &e), vec![json!(5)]);
        assert_eq!(run(&["v==\"x\""], &e), vec![json!(3)]);
        assert_eq!(run(&["v>=[4,2]"], &e), vec![json!(4)]);
        assert_eq!(run(&["v<[4,3]"], &e), vec![json!(4)]);
        assert!(run(&["missing==1"], &e).is_empty());
    }

    #[test]
    fn lowest_and_highest_keep_ties() {
        let e = maps(json!([
            {"id": 1, "v": 5}, {"id": 2, "v": 3}, {"id": 3, "v": 7},
            {"id": 4, "v": 3}, {"id": 5, "v": 7}
        ]));
        assert_eq!(run(&["v<<Infinity"], &e), vec![json!(2), json!(4)]);
        assert_eq!(run(&["v>>-Infinity"], &e), vec![json!(3), json!(5)]);
        // Ties with the starting value itself are not kept unless something beat it
        // first, exactly as the reference client's loop does.
        assert_eq!(run(&["v<<5"], &e), vec![json!(2), json!(4)]);
        assert_eq!(run(&["v<<3"], &e), Vec::<Value>::new());
    }

    #[test]
    fn criteria_apply_in_order() {
        let e = maps(json!([
            {"id": 1, "os": "a", "t": 1}, {"id": 2, "os": "b", "t": 5},
            {"id": 3, "os": "a", "t": 4}
        ]));
        assert_eq!(run(&["os==\"a\"", "t>>0"], &e), vec![json!(3)]);
        assert_eq!(run(&["t>>0", "os==\"a\""], &e), Vec::<Value>::new());
    }

    #[test]
    fn unorderable_values_are_excluded() {
        let e = maps(json!([{"id": 1, "v": null}, {"id": 2, "v": {"a": 1}}, {"id": 3, "v": 2}]));
        assert_eq!(run(&["v>1"], &e), vec![json!(3)]);
        assert_eq!(run(&["v<<Infinity"], &e), vec![json!(3)]);
    }
}
