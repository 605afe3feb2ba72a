//! Keeping a URL's password out of every line pgfold writes.

/// Replaces a URL's password wherever it appears in a text: the URL itself,
/// and error messages of client libraries that quote it (as written, or
/// percent-decoded).
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

/// What a password is replaced with.
const HIDDEN: &str = "***";

impl Redactor {
    /// For the password in `url`'s user information, if it has one.
    pub fn for_url(url: &str) -> Redactor {
        let mut secrets = Vec::new();
        if let Some(password) = password(url) {
            let decoded = percent_decode(password);
            if !password.is_empty() {
                secrets.push(password.to_string());
            }
            if !decoded.is_empty() && decoded != password {
                secrets.push(decoded);
            }
        }
        // The longer first: a decoded form may contain the written one.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { secrets }
    }

    /// `text` with the password replaced.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            out = out.replace(s.as_str(), HIDDEN);
        }
        out
    }
}

/// The password of `url` (`scheme://user:password@host/...`), as written.
pub(super) fn password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    Some(password)
}

/// The user name of `url`, as written.
pub(super) fn user(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    Some(userinfo.split_once(':').map_or(userinfo, |(u, _)| u))
}

/// `url` without its user information.
pub(super) fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}

/// `%XX` sequences decoded; anything malformed kept as written.
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_hidden_as_written_and_decoded() {
        let r = Redactor::for_url("amqp://app:s%40cret@rabbit:5672/shop");
        assert_eq!(
            r.redact("amqp://app:s%40cret@rabbit:5672/shop"),
            "amqp://app:***@rabbit:5672/shop"
        );
        assert_eq!(r.redact("auth failed for s@cret"), "auth failed for ***");
        assert_eq!(password("nats://host:4222"), None);
        assert_eq!(user("nats://u:p@host:4222"), Some("u"));
        assert_eq!(
            without_userinfo("nats://u:p@host:4222/x"),
            "nats://host:4222/x"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
