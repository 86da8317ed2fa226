//! Apps and the organizations that own them.

use serde::{Deserialize, Serialize};

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
