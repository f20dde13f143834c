//! A minimal JSON writer for the bench report (the only JSON xtask writes).

use std::fmt::Write;

/// A JSON value.
#[derive(Clone, Debug)]
pub enum Json {
    /// A number; non-finite values are written as `null`, which JSON has no number for.
    Num(f64),
    /// An integer.
    Int(usize),
    /// A string.
    Str(String),
    /// An object, its keys in the given order.
    Obj(Vec<(&'static str, Json)>),
    /// An array.
    Arr(Vec<Json>),
}

impl Json {
    /// The value as indented JSON text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = |out: &mut String, depth: usize| out.extend(std::iter::repeat_n("  ", depth));
        match self {
            Json::Num(x) if x.is_finite() => write!(out, "{x}").expect("writing to a String"),
            Json::Num(_) => out.push_str("null"),
            Json::Int(i) => write!(out, "{i}").expect("writing to a String"),
            Json::Str(s) => write_str(out, s),
            Json::Obj(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Obj(fields) => {
                out.push_str("{\n");
                for (i, (key, value)) in fields.iter().enumerate() {
                    pad(out, depth + 1);
                    write_str(out, key);
                    out.push_str(": ");
                    value.write(out, depth + 1);
                    out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
                }
                pad(out, depth);
                out.push('}');
            }
            Json::Arr(items) => {
                out.push_str("[\n");
                for (i, value) in items.iter().enumerate() {
                    pad(out, depth + 1);
                    value.write(out, depth + 1);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                pad(out, depth);
                out.push(']');
            }
        }
    }
}

/// Writes `s` as a JSON string literal, escaping quotes, backslashes and control characters.
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).expect("writing to a String"),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: Json, expected: &str) {
        assert_eq!(value.render(), expected);
    }

    #[test]
    fn scalars() {
        check(Json::Num(1.5), "1.5");
        check(Json::Num(f64::NAN), "null");
        check(Json::Num(f64::INFINITY), "null");
        check(Json::Int(42), "42");
        check(Json::Str("a \"b\" \\ c\n\u{1}é".into()), r#""a \"b\" \\ c\n\u0001é""#);
    }

    #[test]
    fn nesting() {
        check(Json::Obj(vec![]), "{}");
        check(Json::Arr(vec![]), "[]");
        check(
            Json::Obj(vec![("a", Json::Int(1)), ("b", Json::Arr(vec![Json::Num(0.25), Json::Obj(vec![])]))]),
            "{\n  \"a\": 1,\n  \"b\": [\n    0.25,\n    {}\n  ]\n}",
        );
    }
}
