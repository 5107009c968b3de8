//! CSV fields for the usage export: quoting, and defusing text a spreadsheet would run as a
//! formula (CSV injection).
//!
//! Model names, client names and session ids in the export come from requests, so a member can
//! choose them. Spreadsheets evaluate a cell that starts with `=`, `+`, `-` or `@`, and some also
//! after a leading TAB, CR or LF (or the full-width forms of those signs, which some normalise);
//! such a field gets a leading `'`, which every spreadsheet reads as "this is text".
//!
//! Not here: which rows and columns the export has (`dashboard`).

/// Characters that make a spreadsheet treat a cell as a formula when they lead it (OWASP's
/// list, plus LF and the full-width `＝ ＋ － ＠`).
const FORMULA_LEADERS: [char; 11] = [
    '=', '+', '-', '@', '\t', '\r', '\n', '\u{FF1D}', '\u{FF0B}', '\u{FF0D}', '\u{FF20}',
];

/// One CSV field: defused when it could start a formula, then quoted when it holds a
/// separator, a quote or a line break.
pub fn field(text: &str) -> String {
    let text = if text.starts_with(FORMULA_LEADERS) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_formula_leader_is_defused() {
        for leader in FORMULA_LEADERS {
            let out = field(&format!("{leader}HYPERLINK(\"http://x\")"));
            let unquoted = out.strip_prefix('"').unwrap_or(&out);
            assert!(unquoted.starts_with('\''), "{leader:?} -> {out:?}");
        }
        assert_eq!(field("\t=1+1"), "'\t=1+1");
        assert_eq!(field("\r=1+1"), "\"'\r=1+1\"");
    }

    #[test]
    fn plain_text_is_left_alone_and_separators_are_quoted() {
        assert_eq!(field("gpt-4o"), "gpt-4o");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field(" =not a formula"), " =not a formula");
    }
}
