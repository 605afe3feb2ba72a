//! Just enough of SQL's lexical structure to cut a script into statements and
//! read each one's first word: quotes, dollar quotes and comments.

/// The statements of `sql`, split at semicolons outside quotes and comments,
/// without surrounding blanks; empty ones are left out.
pub fn statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        i = match b[i] {
            b';' => {
                out.push(&sql[start..i]);
                start = i + 1;
                i + 1
            }
            _ => skip_token(sql, i),
        };
    }
    out.push(&sql[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty() && !first_word(s).is_empty())
        .collect()
}

/// The first keyword of `statement`, uppercased, after blanks and comments.
pub fn first_word(statement: &str) -> String {
    let b = statement.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if b[i..].starts_with(b"--") || b[i..].starts_with(b"/*") {
            i = skip_token(statement, i);
            continue;
        }
        break;
    }
    statement[i..]
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// The word, if `statement` ends, begins or changes the transaction it runs in.
pub fn transaction_control(statement: &str) -> Option<String> {
    const WORDS: [&str; 13] = [
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "SAVEPOINT",
        "RELEASE",
        "PREPARE",
        "SET",
        "RESET",
        "DISCARD",
        "VACUUM",
    ];
    let word = first_word(statement);
    WORDS.contains(&word.as_str()).then_some(word)
}

/// The index after the token starting at `i`: a quoted string or identifier, a
/// dollar-quoted string, a comment, or one byte of anything else.
fn skip_token(sql: &str, i: usize) -> usize {
    let b = sql.as_bytes();
    let rest = &b[i..];
    if rest.starts_with(b"--") {
        return b[i..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(b.len(), |n| i + n + 1);
    }
    if rest.starts_with(b"/*") {
        let (mut depth, mut j) = (0usize, i);
        while j < b.len() {
            if b[j..].starts_with(b"/*") {
                depth += 1;
                j += 2;
            } else if b[j..].starts_with(b"*/") {
                depth -= 1;
                j += 2;
                if depth == 0 {
                    return j;
                }
            } else {
                j += 1;
            }
        }
        return b.len();
    }
    match b[i] {
        b'\'' => {
            // E'…' strings escape with backslashes; standard ones double quotes.
            let escapes = i > 0 && matches!(b[i - 1], b'E' | b'e');
            let mut j = i + 1;
            while j < b.len() {
                match b[j] {
                    b'\\' if escapes => j += 2,
                    b'\'' if b.get(j + 1) == Some(&b'\'') => j += 2,
                    b'\'' => return j + 1,
                    _ => j += 1,
                }
            }
            b.len()
        }
        b'"' => b[i + 1..]
            .iter()
            .position(|&c| c == b'"')
            .map_or(b.len(), |n| i + n + 2),
        b'$' => match dollar_tag(sql, i) {
            Some(tag) => sql[i + tag.len()..]
                .find(tag)
                .map_or(b.len(), |n| i + tag.len() + n + tag.len()),
            None => i + 1,
        },
        _ => i + sql[i..].chars().next().map_or(1, char::len_utf8),
    }
}

/// `$tag$` or `$$` at `i`, if one opens a dollar-quoted string there (and not a
/// parameter such as `$1`).
fn dollar_tag(sql: &str, i: usize) -> Option<&str> {
    let rest = &sql[i + 1..];
    let end = rest.find('$')?;
    let tag = &rest[..end];
    let valid = tag
        .chars()
        .enumerate()
        .all(|(n, c)| c == '_' || c.is_alphabetic() || (n > 0 && c.is_ascii_digit()));
    valid.then(|| &sql[i..i + end + 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_split_outside_quotes_and_comments() {
        let sql = "CREATE TABLE a (x text DEFAULT 'a;b');\n\
                   -- a comment; still one\n\
                   CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;\n\
                   /* c; /* nested; */ */ SELECT \"odd;name\" FROM a; ;";
        let parts = statements(sql);
        assert_eq!(parts.len(), 3, "{parts:?}");
        assert!(parts[1].ends_with("LANGUAGE sql"));
        assert_eq!(first_word(parts[2]), "SELECT");
    }

    #[test]
    fn transaction_control_is_recognised_after_comments() {
        assert_eq!(
            transaction_control("-- done\n commit"),
            Some("COMMIT".into())
        );
        assert_eq!(
            transaction_control("SET search_path = x"),
            Some("SET".into())
        );
        assert_eq!(transaction_control("CREATE TABLE settings (x int)"), None);
        assert_eq!(transaction_control("SELECT $1, $$;$$"), None);
    }
}
