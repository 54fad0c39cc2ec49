//! What a configuration file that does not parse is told: the TOML parser's message, with
//! the credentials written inline left out of the lines it quotes and of its own words (it goes
//! to logs and terminals that more people read than the file), and a hint for a Windows path in
//! double quotes.

/// Keys that write credentials inline: `[admin] token`, a route's `auth = { bearer = [...] }`,
/// and any key ending in one of these.
const SECRET_KEYS: [&str; 5] = ["token", "bearer", "secret", "password", "passwd"];

/// The TOML parser's message for a file that does not parse, with the credentials written on
/// the lines it quotes left out: what follows `token =` (and the other [`SECRET_KEYS`]) on such a
/// line reads `…`. The message goes to logs and terminals that more people read than the file,
/// and a value that broke the parse (a token without its quotes) is still the credential.
pub(crate) fn parse_message(error: &toml::de::Error, text: &str) -> String {
    let message = error.to_string();
    // Where the parser stopped is inside a secret's value, perhaps lines below its key (an array
    // or a string over several lines), or the message quotes the value itself ("invalid type:
    // string \"…\""): then nothing of the value is shown (a review found both).
    let in_secret = error.span().and_then(|at| text.get(..at.start)).is_some_and(in_secret_value);
    let mut out = String::with_capacity(message.len());
    for line in message.trim_end().lines() {
        if !out.is_empty() {
            out.push('\n');
        }
        match quoted_text_start(line) {
            // The key's own line keeps the key (`token = …`); a line below it in its value is
            // all left out.
            Some(at) if in_secret && secret_value_at(&line[at..]).is_none() => {
                out.push_str(line[..at].trim_end());
                out.push_str(" …");
            }
            Some(_) => out.push_str(&redact_userinfo(&redact_quoted_line(line))),
            None if in_secret => out.push_str(&redact_quoted_values(line)),
            None => out.push_str(line),
        }
    }
    // A Windows path in double quotes: its backslashes start escapes (a review: the parser's
    // "missing escaped value, expected `b`, `e`, …" did not say what to do).
    if ["escaped value", "unicode value digits", "escape sequence"]
        .iter()
        .any(|m| message.contains(m))
    {
        out.push_str(
            "\n(a backslash in a \"double-quoted\" string starts an escape: write a Windows path in single quotes, \
             'C:\\ProgramData\\wsbridge\\agent.secret', or double each backslash)",
        );
    }
    out
}

/// Whether the end of `before` (the file up to where the parser stopped) is inside the value of
/// a secret key: on its line, or lines below it in an array, an inline table or a multi-line
/// string. A small scan of TOML's lexical structure (strings of the four kinds with their
/// escapes, comments, brackets), so that an `=` inside a string or a comment (a base64 token's
/// padding: a review) is not taken for a key's.
fn in_secret_value(before: &str) -> bool {
    // The keys whose values the scan is inside (an array or inline table after `key =`), with the
    // line's own key-value last while on its line.
    let mut open: Vec<bool> = Vec::new();
    // The key just written (before its `=`), and whether the value after `=` is a secret's.
    let mut key = String::new();
    let mut value: Option<bool> = None;
    let b = before.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let rest = &before[i..];
        if rest.starts_with("\"\"\"") || rest.starts_with("\'\'\'") {
            let quote = &rest[..3];
            match rest[3..].find(quote) {
                // Closed before the error: skip it (and a fourth or fifth quote that ends it).
                Some(end) => {
                    i += 3 + end + 3;
                    while before[i..].starts_with(&quote[..1]) {
                        i += 1;
                    }
                    continue;
                }
                // Still open where the parser stopped.
                None => return value.unwrap_or(false) || open.last().copied().unwrap_or(false),
            }
        }
        match c {
            b'"' | b'\'' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != c && b[j] != b'\n' {
                    j += if c == b'"' && b[j] == b'\\' { 2 } else { 1 };
                }
                if j >= b.len() {
                    // Open where the parser stopped: inside this string.
                    return value.unwrap_or(false) || open.last().copied().unwrap_or(false) || secret_key(&key);
                }
                if value.is_none() {
                    // A quoted key (or an array's element, which counts for nothing).
                    key = before[i + 1..j].to_owned();
                }
                i = j + 1;
                continue;
            }
            b'#' => {
                i = before[i..].find('\n').map_or(b.len(), |n| i + n);
                continue;
            }
            b'=' => {
                value = Some(secret_key(&key) || open.last().copied().unwrap_or(false));
                key.clear();
            }
            b'[' | b'{' if value.is_some() || !open.is_empty() => {
                open.push(value.unwrap_or(false) || open.last().copied().unwrap_or(false));
                value = None;
            }
            b']' | b'}' if !open.is_empty() => {
                open.pop();
                value = None;
            }
            b',' => value = None,
            b'\n' if open.is_empty() => {
                value = None;
                key.clear();
            }
            // A bare key's characters, while no value is being written.
            c if value.is_none() && (c.is_ascii_alphanumeric() || c == b'_' || c == b'-') => {
                if i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'-') {
                    key.clear();
                }
                key.push(c as char);
            }
            _ => {}
        }
        i += 1;
    }
    value.unwrap_or(false) || open.last().copied().unwrap_or(false)
}

/// Whether the key that `before_eq` ends with (the text before an `=`) names a credential.
fn secret_key(before_eq: &str) -> bool {
    let key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let before = before_eq.trim_end();
    // A quoted key (`"bearer" = …`) by its name.
    let before = before.strip_suffix(['"', '\'']).unwrap_or(before);
    let start = before.rfind(|c: char| !key_char(c)).map_or(0, |i| i + 1);
    let key = before[start..].to_ascii_lowercase();
    !key.is_empty() && SECRET_KEYS.iter().any(|s| key.ends_with(s))
}

/// `"…"` in place of a value a line of the parser's own words quotes.
fn redact_quoted_values(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                // The parser's own words (`expected `,``) are in backquotes; a value it quotes
                // (`invalid type: string "…"`) in double quotes.
                if c == '"' {
                    quote = Some(c);
                }
            }
        }
    }
    if quote.is_some() {
        out.push('…');
    }
    out
}

/// A URL's user and password (`scheme://user:pass@host`, an agent's `proxy`) left out of a line.
fn redact_userinfo(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(userinfo) => {
                out.push('…');
                rest = &tail[userinfo..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// One line of a parse error: a quoted line of the file (`12 | text`) keeps its text up to the
/// first secret key's `=`; any other line is kept whole.
fn redact_quoted_line(line: &str) -> std::borrow::Cow<'_, str> {
    let Some(text_at) = quoted_text_start(line) else {
        return line.into();
    };
    match secret_value_at(&line[text_at..]) {
        Some(at) => format!("{} …", &line[..text_at + at].trim_end()).into(),
        None => line.into(),
    }
}

/// Where a quoted line's text starts: after `N | ` (the line number, right-aligned).
fn quoted_text_start(line: &str) -> Option<usize> {
    let rest = line.trim_start();
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let after = rest[digits..].strip_prefix(" |")?;
    let bar = line.len() - after.len();
    Some(if after.starts_with(' ') { bar + 1 } else { bar })
}

/// In a line of TOML: the byte just past the `=` of the first key that is a secret's.
fn secret_value_at(text: &str) -> Option<usize> {
    let mut at = 0;
    while let Some(eq) = text[at..].find('=').map(|i| at + i) {
        if secret_key(&text[..eq]) {
            return Some(eq + 1);
        }
        at = eq + 1;
    }
    None
}
