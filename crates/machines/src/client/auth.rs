//! The `Authorization` header for a Fly token.

use reqwest::header::HeaderValue;

use super::FlyError;

/// `FlyV1 <token>` for macaroon tokens (`fm2_...`, or already prefixed with `FlyV1 `),
/// `Bearer <token>` otherwise, as fly-go does. The value is marked sensitive so that
/// it is never printed by the HTTP stack's debug output.
pub(crate) fn authorization(token: &str) -> Result<HeaderValue, FlyError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(FlyError::InvalidSetting("the Fly API token is empty".into()));
    }
    let value = if token.starts_with("FlyV1 ") {
        token.to_owned()
    } else if token.starts_with("fm1") || token.starts_with("fm2_") {
        format!("FlyV1 {token}")
    } else {
        format!("Bearer {token}")
    };
    let mut header = HeaderValue::from_str(&value).map_err(|_| {
        FlyError::InvalidSetting("the Fly API token has characters a header cannot hold".into())
    })?;
    header.set_sensitive(true);
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(token: &str, expected: &str) {
        let header = authorization(token).expect(token);
        assert_eq!(header.to_str().unwrap(), expected);
        assert!(header.is_sensitive());
    }

    #[test]
    fn macaroons_use_flyv1_and_the_rest_bearer() {
        check("abc123", "Bearer abc123");
        check("fm2_lJPE", "FlyV1 fm2_lJPE");
        check("FlyV1 fm2_lJPE,fm2_x", "FlyV1 fm2_lJPE,fm2_x");
        assert!(authorization("  ").is_err());
        assert!(authorization("bad\ntoken").is_err());
    }
}
