//! The lifecycle FSMs: named lists of steps, and the durable record of a run.
//!
//! A run is recorded before its first step and after every step, so a flyd
//! that dies mid-operation finds the run `running` at the step it was in and
//! runs that step again. Steps are written to be idempotent: each checks the
//! world (is the pilot already up? has the workload already exited?) before
//! acting. The step bodies live in [`crate::steps`]; this module owns the
//! shapes and the order.

use serde::{Deserialize, Serialize};

/// Which operation a run performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsmKind {
    Create,
    Start,
    Stop,
    Suspend,
    Restart,
    Update,
    Destroy,
    Cordon,
}

/// One step of an FSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Write the machine record (state `created`) and its RIB row.
    Record,
    /// Mark `starting` and launch the pilot, unless it already runs (a
    /// suspended workload is continued instead).
    Spawn,
    /// Wait until the services' ports accept connections (bounded).
    Ready,
    /// Mark `started`, publish to the RIB, and watch for the workload's exit.
    Started,
    /// Mark `stopping` and send the stop signal (after SIGCONT, in case
    /// the workload is suspended).
    Signal,
    /// Wait for the exit (SIGKILL after the timeout), then mark `stopped`.
    Exited,
    /// Kill whatever still runs and remove the machine's files.
    Teardown,
    /// Mark `destroyed` and publish it.
    Destroyed,
    /// SIGSTOP the workload's process group and mark `suspended`.
    Freeze,
    /// Replace the config with a new version, keeping the old one listed.
    Reconfigure,
    /// Set or clear `cordoned` and publish it.
    Cordon,
}

impl FsmKind {
    /// The name used in logs and failpoints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Suspend => "suspend",
            Self::Restart => "restart",
            Self::Update => "update",
            Self::Destroy => "destroy",
            Self::Cordon => "cordon",
        }
    }

    /// The steps of this FSM, in order.
    pub fn steps(self) -> &'static [Step] {
        match self {
            Self::Create => &[Step::Record, Step::Spawn, Step::Ready, Step::Started],
            Self::Start => &[Step::Spawn, Step::Ready, Step::Started],
            Self::Stop => &[Step::Signal, Step::Exited],
            Self::Suspend => &[Step::Freeze],
            Self::Restart => &[
                Step::Signal,
                Step::Exited,
                Step::Spawn,
                Step::Ready,
                Step::Started,
            ],
            Self::Update => &[
                Step::Reconfigure,
                Step::Signal,
                Step::Exited,
                Step::Spawn,
                Step::Ready,
                Step::Started,
            ],
            Self::Destroy => &[Step::Teardown, Step::Destroyed],
            Self::Cordon => &[Step::Cordon],
        }
    }
}

impl Step {
    /// The name used in logs and failpoints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::Spawn => "spawn",
            Self::Ready => "ready",
            Self::Started => "started",
            Self::Signal => "signal",
            Self::Exited => "exited",
            Self::Teardown => "teardown",
            Self::Destroyed => "destroyed",
            Self::Freeze => "freeze",
            Self::Reconfigure => "reconfigure",
            Self::Cordon => "cordon",
        }
    }
}

/// Whether a run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Done,
    Failed,
}

/// The durable record of one FSM run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsmRun {
    /// A ULID: runs sort by start time.
    pub id: String,
    pub machine_id: String,
    pub kind: FsmKind,
    /// Index into `kind.steps()` of the step running or next to run.
    pub step: usize,
    pub status: RunStatus,
    /// The operation's parameters (stop signal and timeout, force, ...).
    pub input: serde_json::Value,
    /// What the run left: the machine's state and version when it ended.
    #[serde(default)]
    pub output: serde_json::Value,
    #[serde(default)]
    pub error: Option<String>,
    pub updated_at: i64,
}

impl FsmRun {
    /// A new run at its first step.
    pub fn new(kind: FsmKind, machine_id: &str, input: serde_json::Value) -> Self {
        Self {
            id: ulid::Ulid::new().to_string(),
            machine_id: machine_id.to_string(),
            kind,
            step: 0,
            status: RunStatus::Running,
            input,
            output: serde_json::Value::Null,
            error: None,
            updated_at: hangar_api::time::now_ms(),
        }
    }

    /// Whether the run was asked not to launch the workload: it performs
    /// only the steps that change the record.
    pub fn skip_launch(&self) -> bool {
        self.input.get("skip_launch").and_then(|v| v.as_bool()) == Some(true)
    }

    /// The step to run next, if any remain.
    pub fn current(&self) -> Option<Step> {
        self.kind.steps().get(self.step).copied()
    }
}
