//! Image references: `[http://|https://]host[:port]/repository[:tag|@digest]`.

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
    /// Parses a reference. The registry host is required (there is no default registry);
    /// loopback registries are spoken to over plain HTTP unless `https://` is given.
    pub fn parse(input: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::Reference { input: input.to_owned(), reason };

        let (scheme, rest) = match input.split_once("://") {
            Some(("http", rest)) => (Some("http"), rest),
            Some(("https", rest)) => (Some("https"), rest),
            Some(_) => return Err(invalid("the scheme must be http or https")),
            None => (None, input),
        };
        let Some((registry, path)) = rest.split_once('/') else {
            return Err(invalid("expected registry/repository[:tag]"));
        };
        if registry.is_empty()
            || !(registry.contains('.') || registry.contains(':')) && registry != "localhost"
        {
            return Err(invalid("the first part must be a registry host (registry.example)"));
        }

        // A digest wins over a tag; a tag is after the last `:` that follows the last `/`.
        let (repository, reference) = match path.split_once('@') {
            Some((repo, digest)) => (repo, digest.to_owned()),
            None => match path.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo, tag.to_owned()),
                _ => (path, "latest".to_owned()),
            },
        };
        if repository.is_empty() || !is_repository_name(repository) {
            return Err(invalid("the repository must be lower-case [a-z0-9._-/]"));
        }
        if reference.is_empty() {
            return Err(invalid("empty tag or digest"));
        }

        let scheme = scheme.unwrap_or(if is_loopback(registry) { "http" } else { "https" });
        Ok(Self {
            scheme: scheme.to_owned(),
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            reference,
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

fn is_repository_name(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
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

    fn check(input: &str, expected: &str) {
        let got = match Reference::parse(input) {
            Ok(r) => format!("{} {} {} {}", r.scheme, r.registry, r.repository, r.reference),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expected, "for {input:?}");
    }

    #[test]
    fn parses_references() {
        check("registry.example/app:v1", "https registry.example app v1");
        check("registry.example/team/app", "https registry.example team/app latest");
        check("127.0.0.1:5000/app:v1", "http 127.0.0.1:5000 app v1");
        check("localhost:5000/a/b@sha256:ab", "http localhost:5000 a/b sha256:ab");
        check("https://127.0.0.1:5000/app:v1", "https 127.0.0.1:5000 app v1");
        check("registry.example:443/app:v1", "https registry.example:443 app v1");
    }

    #[test]
    fn rejects_bad_references() {
        check(
            "app:v1",
            "error: invalid image reference \"app:v1\": expected registry/repository[:tag]",
        );
        check(
            "team/app:v1",
            "error: invalid image reference \"team/app:v1\": \
             the first part must be a registry host (registry.example)",
        );
        check(
            "registry.example/App",
            "error: invalid image reference \"registry.example/App\": \
             the repository must be lower-case [a-z0-9._-/]",
        );
        check(
            "ftp://registry.example/app",
            "error: invalid image reference \"ftp://registry.example/app\": \
             the scheme must be http or https",
        );
    }

    #[test]
    fn displays_tags_and_digests() {
        let r = Reference::parse("registry.example/app:v1").expect("valid");
        assert_eq!(r.to_string(), "registry.example/app:v1");
        assert_eq!(r.with_reference("sha256:ab").to_string(), "registry.example/app@sha256:ab");
    }
}
