//! Apps and the organizations that own them.

use serde::{Deserialize, Serialize};

/// Whether `name` is a valid app name: 1-63 lowercase letters, digits and
/// dashes, starting and ending with a letter or digit (it is a DNS label,
/// `<app>.localhost`). The one rule: flaps creates only such names, and the
/// proxy routes only to them.
pub fn valid_app_name(name: &str) -> bool {
    let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    (1..=63).contains(&name.len())
        && name.as_bytes().iter().all(ok)
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// `POST /v1/apps`. Fly clients send the name as `app_name` or `name`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateAppRequest {
    #[serde(default, alias = "name")]
    pub app_name: Option<String>,
    #[serde(default)]
    pub org_slug: Option<String>,
    #[serde(default)]
    pub network: Option<String>,
}

/// The answer to `POST /v1/apps` (201).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateAppResponse {
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// The organization an app belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppOrganization {
    pub name: String,
    pub slug: String,
}

/// An app as `GET /v1/apps/{app}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct App {
    pub id: String,
    pub name: String,
    pub organization: AppOrganization,
    pub network: String,
    pub status: String,
    pub machine_count: u64,
}

/// `GET /v1/apps?org_slug=...`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListAppsResponse {
    pub total_apps: u64,
    pub apps: Vec<App>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_are_dns_labels() {
        for good in ["hello", "a", "my-app-2", &"x".repeat(63)] {
            assert!(valid_app_name(good), "{good}");
        }
        for bad in ["", "Hello", "-a", "a-", "a_b", "a.b", &"x".repeat(64), "ä"] {
            assert!(!valid_app_name(bad), "{bad}");
        }
    }
}
