//! Fuzz target: the `networkcache-download` filters. The input is criteria (one per
//! line) and, after the first NUL byte, a JSON entry list (`[{…}, …]`, non-objects
//! skipped). `Criterion::parse` must accept or refuse each line without panicking;
//! `filter::apply` must not panic and must return a subsequence of its input (same
//! entries, same order) in which every entry has every criterion's key and satisfies
//! every `KEY=="string"` criterion.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use shacachefs::filter::{apply, Criterion, Op, PyValue};

fuzz_target!(|data: &[u8]| {
    let (head, tail) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(head);
    let criteria: Vec<Criterion> = text
        .lines()
        .filter_map(|line| Criterion::parse(line).ok())
        .collect();
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(tail) else {
        return;
    };
    let entries: Vec<&Map<String, Value>> = items.iter().filter_map(Value::as_object).collect();
    let kept = apply(&criteria, entries.clone());

    // A subsequence of the input, by identity.
    let mut rest = entries.iter();
    for k in &kept {
        assert!(
            rest.any(|e| std::ptr::eq(*e, *k)),
            "apply returned an entry out of order or not from its input"
        );
    }
    for c in &criteria {
        for k in &kept {
            assert!(k.contains_key(&c.key), "kept an entry without {:?}", c.key);
            if let (Op::Eq, PyValue::Str(s)) = (c.op, &c.value) {
                assert_eq!(
                    k[&c.key].as_str(),
                    Some(s.as_str()),
                    "kept an entry that {:?} excludes",
                    c.text()
                );
            }
        }
    }
});
