//! Where a plan's entries stand, and its run, as `plan status`, `plan apply` and the API
//! show them.

use crate::prestage::{PrestageStatus, WindowStatus};

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// No mount of its name (and no warm-up of its boot set running).
    NotMounted,
    /// Not mounted; its boot set is being warmed into the disk cache.
    Prestaging,
    /// Mounted; its VM has not read anything yet (or the mount records no boot).
    Mounted,
    /// Mounted; its VM is in its boot window.
    Booting,
    /// Mounted; its boot window has ended (quiet, or at its limit).
    Booted,
    /// Its mount failed in this plan's run.
    Failed,
    /// A mount of its name holds another VM or snapshot than the entry says.
    Conflict,
}

impl EntryState {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::NotMounted => "not mounted",
            EntryState::Prestaging => "pre-staging",
            EntryState::Mounted => "mounted",
            EntryState::Booting => "booting",
            EntryState::Booted => "booted",
            EntryState::Failed => "failed",
            EntryState::Conflict => "conflict",
        }
    }
}

/// What a run did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Mounted by this run.
    Mounted,
    /// Found mounted as the plan says: left as it was.
    AlreadyMounted,
}

/// One entry as `plan status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EntryStatus {
    /// 1 for the first `[[vm]]`.
    pub index: usize,
    pub vm: String,
    pub name: String,
    pub group: i64,
    pub state: EntryState,
    /// What this plan's run did with it; none: nothing yet, or no run.
    #[serde(default)]
    pub action: Option<Action>,
    /// `VM@TIME` mounted (or to be mounted, once the run has resolved it).
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub mount_id: Option<u32>,
    #[serde(default)]
    pub created: Option<jiff::Timestamp>,
    /// Not mounted: the warm-up of its boot set into the disk cache; mounted: the mount's own
    /// pre-staging.
    #[serde(default)]
    pub prestage: Option<PrestageStatus>,
    #[serde(default)]
    pub window: Option<WindowStatus>,
    /// Why its mount failed, or what conflicts.
    #[serde(default)]
    pub error: Option<String>,
    /// Anything else worth knowing (no warm-up, and why).
    #[serde(default)]
    pub note: Option<String>,
}

/// How a run ended, or that it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunPhase {
    Running,
    /// Every group is mounted.
    Done,
    /// A mount failed: the run stopped there (see `error`).
    Failed,
    /// The server stopped before the run ended.
    Stopped,
}

/// A plan's run on this server.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub phase: RunPhase,
    /// The group being mounted or waited for.
    pub group: Option<i64>,
    pub groups: Vec<i64>,
    pub wait_seconds: f64,
    pub started: jiff::Timestamp,
    #[serde(default)]
    pub finished: Option<jiff::Timestamp>,
    /// What stopped the run, and how to undo or go on.
    #[serde(default)]
    pub error: Option<String>,
    /// What happened, in order (a line each).
    pub events: Vec<String>,
}

/// A plan as `plan status` and `plan apply` show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlanStatus {
    pub id: String,
    /// This server's run of the plan, if it has one since it started.
    #[serde(default)]
    pub run: Option<RunInfo>,
    pub entries: Vec<EntryStatus>,
}
