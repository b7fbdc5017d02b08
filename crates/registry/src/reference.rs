//! Image references: `host[:port]/repository[:tag|@digest]`, checked against the
//! distribution spec's grammar.

use std::fmt;

use crate::Error;

/// Where an image goes: a registry, a repository in it, and a tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `https` or `http`.
    pub scheme: String,
    /// `host` or `host:port`.
    pub registry: String,
    /// `name` or `path/name`, lower case.
    pub repository: String,
    /// A tag, or a digest `sha256:...`; `latest` when neither was given.
    pub reference: String,
}

impl Reference {
    /// Parses `host[:port]/repository[:tag|@sha256:<64 hex>]`, checked against the
    /// distribution spec's grammar. The registry host is required (there is no default
    /// registry) and there is no scheme: loopback registries are spoken to over plain HTTP,
    /// every other one over HTTPS.
    pub fn parse(input: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::Reference { input: input.to_owned(), reason };

        if input.contains("://") {
            return Err(invalid("a reference has no scheme (write host/repository:tag)"));
        }
        let Some((registry, path)) = input.split_once('/') else {
            return Err(invalid("expected registry/repository[:tag]"));
        };
        if !is_registry_host(registry) {
            return Err(invalid("the first part must be a registry host (registry.example)"));
        }

        // A digest wins over a tag; a tag is after the last `:` that follows the last `/`.
        let (named, digest) = match path.split_once('@') {
            Some((named, digest)) => (named, Some(digest)),
            None => (path, None),
        };
        let (repository, tag) = match named.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (named, None),
        };
        if !repository.split('/').all(is_path_component) {
            return Err(invalid(
                "each repository path component must match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*",
            ));
        }
        if tag.is_some_and(|tag| !is_tag(tag)) {
            return Err(invalid("a tag must match [A-Za-z0-9_][A-Za-z0-9._-]{0,127}"));
        }
        if digest.is_some_and(|digest| !is_digest(digest)) {
            return Err(invalid("a digest must be sha256: and 64 lower-case hex digits"));
        }
        let reference = digest.or(tag).unwrap_or("latest");

        let scheme = if is_loopback(registry) { "http" } else { "https" };
        Ok(Self {
            scheme: scheme.to_owned(),
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            reference: reference.to_owned(),
        })
    }

    /// The same registry and repository with another tag or digest.
    pub fn with_reference(&self, reference: &str) -> Self {
        Self { reference: reference.to_owned(), ..self.clone() }
    }

    /// `scheme://registry`, the base every API path is joined to.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.registry)
    }

    /// `registry/repository`, without tag: what a machine config pins with `@digest`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.reference.contains(':') { '@' } else { ':' };
        write!(f, "{}/{}{sep}{}", self.registry, self.repository, self.reference)
    }
}

/// `host`, `host:port` or `[v6]:port`, where a name has a dot (or is `localhost`) so that it
/// is not mistaken for the first path component of a repository.
fn is_registry_host(registry: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b".-:[]".contains(&b);
    !registry.is_empty()
        && registry.bytes().all(allowed)
        && (registry.contains('.') || registry.contains(':') || registry == "localhost")
}

/// The distribution spec's path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_path_component(component: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        // One run of letters and digits...
        let run = bytes[i..].iter().take_while(|b| alnum(b)).count();
        if run == 0 {
            return false;
        }
        i += run;
        if i == bytes.len() {
            return true;
        }
        // ...then one separator, which must be followed by another run.
        let separator = bytes[i..].iter().take_while(|b| !alnum(b)).count();
        let ok = match &bytes[i..i + separator] {
            b"." | b"_" | b"__" => true,
            dashes => dashes.iter().all(|&b| b == b'-'),
        };
        if !ok {
            return false;
        }
        i += separator;
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn is_tag(tag: &str) -> bool {
    let first = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let rest = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
    match tag.as_bytes() {
        [head, tail @ ..] => first(*head) && tail.len() <= 127 && tail.iter().all(|&b| rest(b)),
        [] => false,
    }
}

/// `sha256:` and 64 lower-case hex digits (the only digest this client produces).
fn is_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    };
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn check(input: &str, expected: &str) {
        let got = match Reference::parse(input) {
            Ok(r) => format!("{} {} {} {}", r.scheme, r.registry, r.repository, r.reference),
            Err(Error::Reference { reason, .. }) => format!("error: {reason}"),
            Err(e) => format!("other error: {e}"),
        };
        assert_eq!(got, expected, "for {input:?}");
    }

    #[test]
    fn accepts_good_references() {
        let digest = format!("sha256:{HEX}");
        let table: &[(&str, &str)] = &[
            ("registry.example/app:v1", "https registry.example app v1"),
            ("registry.example/team/app", "https registry.example team/app latest"),
            ("127.0.0.1:5000/app:v1", "http 127.0.0.1:5000 app v1"),
            ("registry.example:443/app:v1", "https registry.example:443 app v1"),
            ("localhost/a.b_c__d---e:_V1.2-x", "http localhost a.b_c__d---e _V1.2-x"),
            ("[::1]:5000/app:v1", "http [::1]:5000 app v1"),
        ];
        for (input, expected) in table {
            check(input, expected);
        }
        check(
            &format!("localhost:5000/a/b@{digest}"),
            &format!("http localhost:5000 a/b {digest}"),
        );
        check(
            &format!("registry.example/a:v1@{digest}"),
            &format!("https registry.example a {digest}"),
        );
        check(
            &format!("registry.example/a:{}", "t".repeat(128)),
            &format!("https registry.example a {}", "t".repeat(128)),
        );
    }

    #[test]
    fn rejects_bad_references() {
        let host = "error: the first part must be a registry host (registry.example)";
        let component =
            "error: each repository path component must match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*";
        let tag = "error: a tag must match [A-Za-z0-9_][A-Za-z0-9._-]{0,127}";
        let digest = "error: a digest must be sha256: and 64 lower-case hex digits";
        let scheme = "error: a reference has no scheme (write host/repository:tag)";
        let long_tag = format!("registry.example/app:{}", "t".repeat(129));
        let upper_digest = format!("registry.example/app@sha256:{}", HEX.to_uppercase());
        let short_digest = format!("registry.example/app@sha256:{}", &HEX[1..]);
        let other_algorithm = format!("registry.example/app@sha512:{HEX}");
        let table: &[(&str, &str)] = &[
            ("app:v1", "error: expected registry/repository[:tag]"),
            ("team/app:v1", host),
            ("/app", host),
            ("reg istry.example/app", host),
            ("registry.example/App", component),
            ("registry.example/", component),
            ("registry.example/a//b", component),
            ("registry.example/a/../b", component),
            ("registry.example/..", component),
            ("registry.example/a/", component),
            ("registry.example/-a", component),
            ("registry.example/a.", component),
            ("registry.example/a..b", component),
            ("registry.example/a___b", component),
            ("registry.example/a b", component),
            ("registry.example/app:", tag),
            ("registry.example/app:v 1", tag),
            ("registry.example/app:-v1", tag),
            ("registry.example/app:.v1", tag),
            ("registry.example/app:v1+x", tag),
            (&long_tag, tag),
            ("registry.example/app@", digest),
            ("registry.example/app@sha256:ab", digest),
            (&upper_digest, digest),
            (&short_digest, digest),
            (&other_algorithm, digest),
            ("http://registry.example/app:v1", scheme),
            ("https://127.0.0.1:5000/app:v1", scheme),
            ("ftp://registry.example/app", scheme),
        ];
        for (input, expected) in table {
            check(input, expected);
        }
    }

    #[test]
    fn displays_tags_and_digests() {
        let r = Reference::parse("registry.example/app:v1").expect("valid");
        assert_eq!(r.to_string(), "registry.example/app:v1");
        assert_eq!(r.with_reference("sha256:ab").to_string(), "registry.example/app@sha256:ab");
    }
}
