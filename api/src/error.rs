//! The error body of every failed API call.

use serde::{Deserialize, Serialize};

/// `{"error": "...", "status": "..."}`: Fly's `ErrorResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A one-line, human-readable reason.
    pub error: String,
    /// A machine-readable code where Fly defines one (`name_taken`,
    /// `insufficient_capacity`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl ErrorBody {
    /// An error with only a message.
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            status: None,
        }
    }
}
