//! Workload files (`benches/workloads/*.toml`): what load to offer, with
//! per-profile overrides (`[profile.ci]`) so CI runs the same workloads,
//! shorter. Unknown keys are errors, as in the main configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::load::Pattern;

/// Why a workload file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key that does not exist.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Pattern names as written in workload files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatternName {
    /// See [`Pattern::Personal`].
    Personal,
    /// See [`Pattern::Group`].
    Group,
    /// See [`Pattern::Offline`].
    Offline,
    /// See [`Pattern::Churn`].
    Churn,
    /// See [`Pattern::Jitter`].
    Jitter,
}

/// Searching for the highest rate a backend sustains within a latency bound.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ramp {
    /// First rate tried, messages/s.
    pub start: f64,
    /// Each next rate is this many times the last.
    pub factor: f64,
    /// Highest rate tried.
    pub max: f64,
    /// A step passes when its p99 end-to-end latency is at most this.
    pub p99_bound_ms: f64,
    /// Seconds per step, warm-up included (the workload's warm-up applies).
    pub step_secs: f64,
}

/// Settings a profile may change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    users: Option<usize>,
    rate: Option<f64>,
    size: Option<usize>,
    duration_secs: Option<f64>,
    warmup_secs: Option<f64>,
    members: Option<usize>,
    connects_per_sec: Option<f64>,
    close_after_ms: Option<[u64; 2]>,
    offline_ms: Option<[u64; 2]>,
    /// `false` turns the ramp off.
    ramp: Option<bool>,
    /// `false` skips the raw-broker baseline.
    raw_baseline: Option<bool>,
}

/// One workload file as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    name: String,
    description: String,
    pattern: PatternName,
    users: usize,
    rate: f64,
    size: usize,
    duration_secs: f64,
    warmup_secs: f64,
    members: Option<usize>,
    offline_share: Option<f64>,
    connects_per_sec: Option<f64>,
    hold_ms: Option<u64>,
    close_after_ms: Option<[u64; 2]>,
    offline_ms: Option<[u64; 2]>,
    #[serde(default = "yes")]
    raw_baseline: bool,
    ramp: Option<Ramp>,
    #[serde(default)]
    profile: BTreeMap<String, Overrides>,
}

fn yes() -> bool {
    true
}

/// A workload ready to run (a profile's overrides applied).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Workload {
    /// Short name (`personal`).
    pub name: String,
    /// One line for the report.
    pub description: String,
    /// Who sends to whom.
    pub pattern: Pattern,
    /// Virtual users.
    pub users: usize,
    /// Messages per second, all users together (the fixed-rate run).
    pub rate: f64,
    /// Content bytes.
    pub size: usize,
    /// Seconds of sending, warm-up included.
    pub duration_secs: f64,
    /// Leading seconds not measured.
    pub warmup_secs: f64,
    /// Whether to measure the broker alone with this pattern.
    pub raw_baseline: bool,
    /// The ramp, if on.
    pub ramp: Option<Ramp>,
}

impl Workload {
    /// Reads a workload file and applies `profile`'s overrides, if the file
    /// has that profile.
    pub fn load(path: &Path, profile: &str) -> Result<Workload, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: WorkloadFile = toml::from_str(&text).map_err(|source| WorkloadError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        Self::from_file(file, profile).map_err(|message| WorkloadError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    fn from_file(mut f: WorkloadFile, profile: &str) -> Result<Workload, String> {
        let mut ramp_on = true;
        if let Some(o) = f.profile.get(profile).cloned() {
            f.users = o.users.unwrap_or(f.users);
            f.rate = o.rate.unwrap_or(f.rate);
            f.size = o.size.unwrap_or(f.size);
            f.duration_secs = o.duration_secs.unwrap_or(f.duration_secs);
            f.warmup_secs = o.warmup_secs.unwrap_or(f.warmup_secs);
            f.members = o.members.or(f.members);
            f.connects_per_sec = o.connects_per_sec.or(f.connects_per_sec);
            f.close_after_ms = o.close_after_ms.or(f.close_after_ms);
            f.offline_ms = o.offline_ms.or(f.offline_ms);
            ramp_on = o.ramp.unwrap_or(true);
            f.raw_baseline = o.raw_baseline.unwrap_or(f.raw_baseline);
        }
        let missing = |k: &str| format!("pattern {:?} needs `{k}`", f.pattern);
        let pattern = match f.pattern {
            PatternName::Personal => Pattern::Personal,
            PatternName::Group => Pattern::Group {
                members: f.members.ok_or_else(|| missing("members"))?,
            },
            PatternName::Offline => Pattern::Offline {
                offline_share: f.offline_share.ok_or_else(|| missing("offline_share"))?,
            },
            PatternName::Churn => Pattern::Churn {
                connects_per_sec: f
                    .connects_per_sec
                    .ok_or_else(|| missing("connects_per_sec"))?,
                hold_ms: f.hold_ms.unwrap_or(1000),
            },
            PatternName::Jitter => Pattern::Jitter {
                members: f.members.ok_or_else(|| missing("members"))?,
                close_after_ms: f.close_after_ms.unwrap_or([10_000, 20_000]),
                offline_ms: f.offline_ms.unwrap_or([1_500, 2_500]),
            },
        };
        let w = Workload {
            name: f.name,
            description: f.description,
            pattern,
            users: f.users,
            rate: f.rate,
            size: f.size,
            duration_secs: f.duration_secs,
            warmup_secs: f.warmup_secs,
            raw_baseline: f.raw_baseline,
            ramp: f.ramp.filter(|_| ramp_on),
        };
        w.validate()?;
        Ok(w)
    }

    fn validate(&self) -> Result<(), String> {
        if !crate::is_safe_name(&self.name) {
            return Err("name must be 1 to 32 characters of [a-z0-9_-]".into());
        }
        if self.users == 0 || self.users > 100_000 {
            return Err("users must be 1 to 100000".into());
        }
        if !(self.rate > 0.0 && self.rate <= 1_000_000.0) {
            return Err("rate must be above 0 and at most 1000000".into());
        }
        if self.size < 32 || self.size > 65_536 {
            return Err("size must be 32 to 65536 bytes".into());
        }
        if !(self.duration_secs > self.warmup_secs && self.warmup_secs >= 0.0) {
            return Err("duration_secs must exceed warmup_secs, which must be at least 0".into());
        }
        match self.pattern {
            Pattern::Group { members } | Pattern::Jitter { members, .. }
                if !(2..=1000).contains(&members) =>
            {
                return Err("members must be 2 to 1000".into())
            }
            Pattern::Jitter {
                close_after_ms,
                offline_ms,
                ..
            } if [close_after_ms, offline_ms]
                .iter()
                .any(|[lo, hi]| *lo == 0 || lo > hi) =>
            {
                return Err(
                    "close_after_ms and offline_ms must be [min, max], 0 < min <= max".into(),
                )
            }
            Pattern::Offline { offline_share } if !(0.0..=1.0).contains(&offline_share) => {
                return Err("offline_share must be 0 to 1".into())
            }
            Pattern::Churn {
                connects_per_sec, ..
            } if connects_per_sec.is_nan() || connects_per_sec <= 0.0 => {
                return Err("connects_per_sec must be positive".into())
            }
            _ => {}
        }
        if matches!(self.pattern, Pattern::Jitter { .. })
            && (self.ramp.is_some() || self.raw_baseline)
        {
            return Err(
                "the jitter pattern has no ramp and no raw baseline (raw_baseline = false)".into(),
            );
        }
        if let Some(r) = &self.ramp {
            if !(r.start > 0.0 && r.factor > 1.0 && r.max >= r.start && r.p99_bound_ms > 0.0)
                || r.step_secs <= self.warmup_secs
            {
                return Err("ramp needs start > 0, factor > 1, max >= start, p99_bound_ms > 0 and step_secs > warmup_secs".into());
            }
        }
        Ok(())
    }

    /// The fixed-rate run's duration.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_secs)
    }

    /// The warm-up.
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_secs)
    }

    /// The rates a ramp tries, in order.
    pub fn ramp_rates(&self) -> Vec<f64> {
        let Some(r) = &self.ramp else {
            return Vec::new();
        };
        let mut rates = vec![r.start];
        while let Some(last) = rates.last().copied() {
            let next = (last * r.factor).round();
            if next > r.max || rates.len() >= 32 {
                break;
            }
            rates.push(next);
        }
        rates
    }
}

/// Every `*.toml` in `dir` whose name is in `names` (all when empty), in
/// file-name order.
pub fn load_dir(
    dir: &Path,
    names: &[String],
    profile: &str,
) -> Result<Vec<Workload>, WorkloadError> {
    let read_err = |source| WorkloadError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let w = Workload::load(&p, profile)?;
        if names.is_empty() || names.contains(&w.name) {
            out.push(w);
        }
    }
    if let Some(missing) = names.iter().find(|n| !out.iter().any(|w| &w.name == *n)) {
        return Err(WorkloadError::Invalid {
            path: dir.to_owned(),
            message: format!("no workload named {missing:?} here"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, profile: &str) -> Result<Workload, String> {
        let f: WorkloadFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Workload::from_file(f, profile)
    }

    const GROUP: &str = r#"
        name = "group"
        description = "channels"
        pattern = "group"
        members = 10
        users = 300
        rate = 1000
        size = 100
        duration_secs = 20
        warmup_secs = 5
        [ramp]
        start = 500
        factor = 2
        max = 4000
        p99_bound_ms = 50
        step_secs = 10
        [profile.ci]
        users = 60
        duration_secs = 5
        warmup_secs = 1
        ramp = false
    "#;

    #[test]
    fn profiles_override_and_turn_the_ramp_off() {
        let full = parse(GROUP, "full").expect("valid");
        assert_eq!(full.pattern, Pattern::Group { members: 10 });
        assert_eq!(full.ramp_rates(), vec![500.0, 1000.0, 2000.0, 4000.0]);
        let ci = parse(GROUP, "ci").expect("valid");
        assert_eq!((ci.users, ci.duration_secs, ci.rate), (60, 5.0, 1000.0));
        assert!(ci.ramp.is_none());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let typo = GROUP.replace("members = 10", "member = 10");
        assert!(parse(&typo, "full").is_err());
        let no_members = GROUP.replace("members = 10", "");
        assert!(parse(&no_members, "full").is_err_and(|e| e.contains("members")));
        let bad_rate = GROUP.replace("rate = 1000", "rate = -1");
        assert!(parse(&bad_rate, "full").is_err());
    }

    #[test]
    fn jitter_ranges_default_and_are_checked() {
        let jitter = r#"
            name = "jitter"
            description = "resets"
            pattern = "jitter"
            members = 10
            users = 100
            rate = 50
            size = 64
            duration_secs = 30
            warmup_secs = 0
            raw_baseline = false
            [profile.ci]
            close_after_ms = [3000, 6000]
        "#;
        let full = parse(jitter, "full").expect("valid");
        assert_eq!(
            full.pattern,
            Pattern::Jitter {
                members: 10,
                close_after_ms: [10_000, 20_000],
                offline_ms: [1_500, 2_500]
            }
        );
        let ci = parse(jitter, "ci").expect("valid");
        assert!(matches!(
            ci.pattern,
            Pattern::Jitter {
                close_after_ms: [3000, 6000],
                ..
            }
        ));
        let with_raw = jitter.replace("raw_baseline = false", "");
        assert!(parse(&with_raw, "full").is_err_and(|e| e.contains("raw baseline")));
        let reversed = jitter.replace("[3000, 6000]", "[6000, 3000]");
        assert!(parse(&reversed, "ci").is_err_and(|e| e.contains("close_after_ms")));
    }

    #[test]
    fn the_shipped_workloads_parse_in_every_profile() {
        // The workload files stay at the workspace root, where `fanout
        // bench` looks for them by default.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/workloads");
        for profile in ["full", "ci"] {
            let all = load_dir(&dir, &[], profile).expect("shipped workloads are valid");
            let names: Vec<_> = all.iter().map(|w| w.name.as_str()).collect();
            for needed in ["personal", "group", "churn", "offline", "jitter"] {
                assert!(names.contains(&needed), "{needed} missing in {names:?}");
            }
        }
    }
}
