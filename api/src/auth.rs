//! How a caller presents an API token: `Authorization: Bearer <token>`, or
//! `FlyV1 <token>` as Fly's clients send it (schemes in any case). flaps
//! reads it from `Authorization`, the proxy from `Proxy-Authorization`.

/// The token in an `Authorization` (or `Proxy-Authorization`) value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (["bearer", "flyv1"].contains(&scheme.to_ascii_lowercase().as_str()) && !token.is_empty())
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_flyv1_schemes_are_accepted() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("FlyV1 abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
