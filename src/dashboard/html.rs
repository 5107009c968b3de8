//! Escaping-safe HTML for the dashboard: markup comes only from string literals, everything else
//! is escaped on the way in, so a username, prompt or tool input can never become markup.
//!
//! [`w!`] is the one way to write a page: `w!(page, "<td>", (user.name), "</td>")` writes the
//! literals as they are and the parenthesised expressions escaped. [`Html::raw`] takes only
//! `&'static str`, so no runtime string reaches the page unescaped.
//!
//! Not here: what the pages show (`dashboard`), or the charts' numbers.

use std::fmt::{self, Display, Write};

/// A page (or fragment) being written.
#[derive(Default)]
pub struct Html(String);

impl Html {
    pub fn new() -> Html {
        Html(String::with_capacity(16 * 1024))
    }

    /// Markup from the program itself.
    pub fn raw(&mut self, markup: &'static str) {
        self.0.push_str(markup);
    }

    /// Anything displayable, escaped for both text and attribute values.
    pub fn text(&mut self, value: &dyn Display) {
        let mut escaper = Escaper(&mut self.0);
        let _ = write!(escaper, "{value}");
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

struct Escaper<'a>(&'a mut String);

impl Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '&' => self.0.push_str("&amp;"),
                '<' => self.0.push_str("&lt;"),
                '>' => self.0.push_str("&gt;"),
                '"' => self.0.push_str("&quot;"),
                '\'' => self.0.push_str("&#39;"),
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

/// Writes literals as markup and `(expr)` parts escaped; see the module comment.
macro_rules! w {
    ($page:expr $(, $part:tt)* $(,)?) => {{
        let page: &mut $crate::dashboard::html::Html = $page;
        $( $crate::dashboard::html::w!(@part page, $part); )*
    }};
    (@part $page:ident, $literal:literal) => { $page.raw($literal) };
    (@part $page:ident, ($value:expr)) => { $page.text(&$value) };
}
pub(crate) use w;

/// A path segment with everything but unreserved characters (and `:`, which a path segment may
/// hold: session ids are `{user id}:{client session id}`) percent-encoded, so a session id
/// chosen by a client (`/`, `?`, `#`, spaces) stays one segment of a link.
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A query-string value, encoded like a path segment.
pub fn query_value(text: &str) -> String {
    path_segment(text)
}

/// A horizontal bar chart as inline SVG: one labelled bar per item, lengths relative to the
/// largest. `label` is how each value is printed beside its bar.
pub fn bar_chart(page: &mut Html, title: &str, items: &[(String, f64, String)]) {
    const ROW: usize = 22;
    const LABEL_W: f64 = 190.0;
    const BAR_W: f64 = 330.0;
    let height = (items.len().max(1) * ROW + 6) as f64;
    let max = items.iter().map(|i| i.1).fold(0.0_f64, f64::max);
    w!(
        page,
        "<figure class=\"chart\"><figcaption>",
        (title),
        "</figcaption>"
    );
    if items.is_empty() {
        w!(
            page,
            "<p class=\"muted\">Nothing recorded yet.</p></figure>"
        );
        return;
    }
    w!(
        page,
        "<svg role=\"img\" viewBox=\"0 0 640 ",
        (height),
        "\" width=\"100%\" aria-label=\"",
        (title),
        "\">"
    );
    for (i, (name, value, shown)) in items.iter().enumerate() {
        let y = (i * ROW + 4) as f64;
        let len = if max > 0.0 {
            (value / max * BAR_W).max(1.0)
        } else {
            1.0
        };
        let short: String = name.chars().take(28).collect();
        w!(
            page,
            "<g><title>",
            (name),
            ": ",
            (shown),
            "</title>",
            "<text x=\"",
            (LABEL_W - 6.0),
            "\" y=\"",
            (y + 14.0),
            "\" text-anchor=\"end\">",
            (short),
            "</text>",
            "<rect x=\"",
            (LABEL_W),
            "\" y=\"",
            (y),
            "\" width=\"",
            (format!("{len:.1}")),
            "\" height=\"",
            (ROW - 6),
            "\" rx=\"2\"></rect>",
            "<text x=\"",
            (format!("{:.1}", LABEL_W + len + 6.0)),
            "\" y=\"",
            (y + 14.0),
            "\">",
            (shown),
            "</text></g>"
        );
    }
    w!(page, "</svg></figure>");
}

/// A column chart as inline SVG (one column per item, labels under every `label_every`th).
pub fn column_chart(
    page: &mut Html,
    title: &str,
    items: &[(String, f64, String)],
    label_every: usize,
) {
    const H: f64 = 150.0;
    let n = items.len().max(1);
    // Few columns stay slim rather than one bar filling the chart.
    let col = (600.0 / n as f64).min(48.0);
    let max = items.iter().map(|i| i.1).fold(0.0_f64, f64::max);
    w!(
        page,
        "<figure class=\"chart\"><figcaption>",
        (title),
        "</figcaption>",
        "<svg role=\"img\" viewBox=\"0 0 640 190\" width=\"100%\" aria-label=\"",
        (title),
        "\">",
        "<line x1=\"20\" y1=\"",
        (H + 5.0),
        "\" x2=\"630\" y2=\"",
        (H + 5.0),
        "\" class=\"axis\"></line>"
    );
    for (i, (name, value, shown)) in items.iter().enumerate() {
        let h = if max > 0.0 {
            value / max * (H - 10.0)
        } else {
            0.0
        };
        let x = 25.0 + i as f64 * col;
        w!(
            page,
            "<g><title>",
            (name),
            ": ",
            (shown),
            "</title><rect x=\"",
            (format!("{x:.1}")),
            "\" y=\"",
            (format!("{:.1}", H + 5.0 - h)),
            "\" width=\"",
            (format!("{:.1}", (col - 2.0).max(1.0))),
            "\" height=\"",
            (format!("{h:.1}")),
            "\"></rect>"
        );
        if label_every > 0 && i % label_every == 0 {
            w!(
                page,
                "<text x=\"",
                (format!("{x:.1}")),
                "\" y=\"",
                (H + 22.0),
                "\">",
                (name),
                "</text>"
            );
        }
        w!(page, "</g>");
    }
    w!(page, "</svg></figure>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_and_literals_are_not() {
        let mut page = Html::new();
        let name = "<script>alert('x')</script>&\"";
        w!(&mut page, "<td title=\"", (name), "\">", (name), "</td>");
        assert_eq!(
            page.into_string(),
            "<td title=\"&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;\">&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;</td>"
        );
    }

    #[test]
    fn path_segments_keep_slashes_and_queries_out() {
        assert_eq!(path_segment("a/b?c d#é"), "a%2Fb%3Fc%20d%23%C3%A9");
        assert_eq!(path_segment("sess-1_2.3~"), "sess-1_2.3~");
        assert_eq!(path_segment("u-1:sess"), "u-1:sess");
    }
}
