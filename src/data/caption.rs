//! Caption cleaning, character for character the reference `pre_caption` functions, because the
//! tokenizer sees their output: a different cleaning gives different token ids than the PyTorch code.

use crate::config::CaptionStyle;

/// Cleans a caption as the reference code does before tokenising, then keeps at most `max_words` words.
///
/// ALBEF: lowercase; delete `, . ' ! ? " ( ) * # : ; ~`; `-` and `/` become spaces; `<person>` becomes
/// `person`. BLIP: lowercase; `. ! " ( ) * # : ; ~` become spaces (commas, apostrophes, question marks,
/// hyphens and slashes stay). Both then replace every run of two or more whitespace characters by one
/// space, strip a trailing newline and then leading/trailing spaces, split on single spaces and keep the
/// first `max_words` pieces. Like the reference, a lone tab or newline inside the text is not a run
/// and stays (the tokenizer splits on it anyway).
pub fn pre_caption(caption: &str, max_words: usize, style: CaptionStyle) -> String {
    let lower = caption.to_lowercase();
    let mut text = String::with_capacity(lower.len());
    match style {
        CaptionStyle::Albef => {
            for c in lower.chars() {
                match c {
                    ',' | '.' | '\'' | '!' | '?' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~' => {}
                    '-' | '/' => text.push(' '),
                    _ => text.push(c),
                }
            }
            text = text.replace("<person>", "person");
        }
        CaptionStyle::Blip => {
            for c in lower.chars() {
                match c {
                    '.' | '!' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~' => text.push(' '),
                    _ => text.push(c),
                }
            }
        }
    }
    let collapsed = collapse_whitespace_runs(&text);
    let stripped = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = stripped.split(' ').collect();
    if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        stripped.to_string()
    }
}

/// Python's `re.sub(r"\s{2,}", " ", text)`: runs of at least two whitespace characters become one space.
fn collapse_whitespace_runs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    for c in text.chars() {
        if is_python_space(c) {
            run.push(c);
            continue;
        }
        flush_run(&mut out, &mut run);
        out.push(c);
    }
    flush_run(&mut out, &mut run);
    out
}

fn flush_run(out: &mut String, run: &mut String) {
    if run.chars().nth(1).is_some() {
        out.push(' ');
    } else {
        out.push_str(run);
    }
    run.clear();
}

/// Python's `\s` for str patterns: Unicode whitespace plus the ASCII separators U+001C..U+001F, which
/// Python counts as whitespace and Unicode does not.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CaptionStyle::{Albef, Blip};

    fn albef(s: &str) -> String {
        pre_caption(s, 30, Albef)
    }
    fn blip(s: &str) -> String {
        pre_caption(s, 30, Blip)
    }

    #[test]
    fn albef_cases() {
        let cases = [
            ("A seahorse.", "a seahorse"),
            ("A hoverfly resembles a honeybee drone.", "a hoverfly resembles a honeybee drone"),
            ("Two dogs, playing!", "two dogs playing"),
            ("The man's hat?", "the mans hat"),
            ("\"Quoted\" (text) *bold* #tag: a; b~", "quoted text bold tag a b"),
            ("well-known black/white cat", "well known black white cat"),
            ("a - b", "a b"),
            ("<person> rides a bike", "person rides a bike"),
            ("<PERSON> waves", "person waves"),
            ("  lots   of    spaces  ", "lots of spaces"),
            ("ends with newline\n", "ends with newline"),
            ("ends with space and newline \n", "ends with space and newline"),
            ("tab\tinside", "tab\tinside"),
            ("two\t\ttabs", "two tabs"),
            ("line\n\nbreaks", "line breaks"),
            ("...", ""),
            ("", ""),
            ("ÉCOLE Über", "école über"),
            ("no-brackets [mask] <b>", "no brackets [mask] <b>"),
            ("nbsp\u{a0}\u{a0}run", "nbsp run"),
            ("file\u{1c}\u{1d}sep", "file sep"),
        ];
        for (input, want) in cases {
            assert_eq!(albef(input), want, "input {input:?}");
        }
    }

    #[test]
    fn blip_cases() {
        let cases = [
            ("A seahorse.", "a seahorse"),
            ("Two dogs, playing!", "two dogs, playing"),
            ("The man's hat?", "the man's hat?"),
            ("well-known black/white cat", "well-known black/white cat"),
            ("a.b", "a b"),
            ("(x) \"y\" *z* #w: v; u~", "x y z w v u"),
            ("<person> waves", "<person> waves"),
            ("  many   spaces.  ", "many spaces"),
            ("tab\tinside", "tab\tinside"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(blip(input), want, "input {input:?}");
        }
    }

    #[test]
    fn truncates_to_max_words() {
        assert_eq!(pre_caption("one two three four", 2, Albef), "one two");
        assert_eq!(pre_caption("one two three", 3, Albef), "one two three");
        assert_eq!(pre_caption("One, two. Three!", 2, Blip), "one, two");
        assert_eq!(pre_caption("a b", 0, Albef), "");
        // A lone tab does not split words, exactly like Python's `split(' ')`.
        assert_eq!(pre_caption("a\tb c", 1, Albef), "a\tb");
    }

    #[test]
    fn cleaning_is_idempotent() {
        for s in ["A (very) well-known; dog.", "x  y", "a/b/c", "<person>'s ball"] {
            for style in [Albef, Blip] {
                let once = pre_caption(s, 30, style);
                assert_eq!(pre_caption(&once, 30, style), once, "{s:?} {style:?}");
            }
        }
    }
}
