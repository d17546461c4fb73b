//! Retention rules: which snapshots a policy keeps, and why.
//!
//! The rules are restic's (and, but for one detail below, Proxmox Backup Server's): a VM's
//! snapshots are taken newest first; `keep_last N` keeps the N newest; `keep_hourly N` keeps
//! the newest snapshot of each of the last N hours that have a snapshot, and so on for days,
//! ISO weeks (Monday to Sunday, numbered as ISO 8601 does), months and years. Every rule counts
//! its own periods, so one snapshot may be kept by several rules, and a snapshot no rule keeps
//! is forgotten. (PBS skips, in a later rule, periods a snapshot kept by an earlier rule
//! already covers; restic does not, and neither do we: a policy keeps at least what either
//! would.) Periods are calendar periods in UTC, whatever the local time zone.
//!
//! Owns: the policy (`[retention]` in a config file, or `--keep-*`), its checks, and the pure
//! decision per snapshot. Must not: read or write the repository (the forget command does
//! that, with the leases).

use jiff::Timestamp;

use super::RepoError;

/// A retention policy: how many of each period to keep. A rule left out keeps nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
}

/// A rule of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    pub const ALL: [Rule; 6] = [
        Rule::Last,
        Rule::Hourly,
        Rule::Daily,
        Rule::Weekly,
        Rule::Monthly,
        Rule::Yearly,
    ];

    /// The option that sets it, as an operator types it.
    pub fn flag(self) -> &'static str {
        match self {
            Rule::Last => "--keep-last",
            Rule::Hourly => "--keep-hourly",
            Rule::Daily => "--keep-daily",
            Rule::Weekly => "--keep-weekly",
            Rule::Monthly => "--keep-monthly",
            Rule::Yearly => "--keep-yearly",
        }
    }

    /// The period `t` falls in, as text (`2026-12-06T04`, `2026-12-06`, `2026-W49`, `2026-12`,
    /// `2026`); `Last` has no period (each snapshot is its own).
    pub fn period(self, t: Timestamp) -> Option<String> {
        let d = t.to_zoned(jiff::tz::TimeZone::UTC).datetime();
        match self {
            Rule::Last => None,
            Rule::Hourly => Some(format!("{}T{:02}", d.date(), d.hour())),
            Rule::Daily => Some(d.date().to_string()),
            Rule::Weekly => {
                let w = d.date().iso_week_date();
                Some(format!("{:04}-W{:02}", w.year(), w.week()))
            }
            Rule::Monthly => Some(format!("{:04}-{:02}", d.year(), d.month())),
            Rule::Yearly => Some(format!("{:04}", d.year())),
        }
    }
}

/// Why a snapshot is kept: the rule, and the period it is the newest snapshot of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reason {
    pub rule: Rule,
    /// None for `last`.
    pub period: Option<String>,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.period {
            None => write!(f, "last"),
            Some(p) => write!(f, "{} {p}", format!("{:?}", self.rule).to_lowercase()),
        }
    }
}

impl Policy {
    fn count(&self, rule: Rule) -> Option<u32> {
        match rule {
            Rule::Last => self.keep_last,
            Rule::Hourly => self.keep_hourly,
            Rule::Daily => self.keep_daily,
            Rule::Weekly => self.keep_weekly,
            Rule::Monthly => self.keep_monthly,
            Rule::Yearly => self.keep_yearly,
        }
    }

    /// Whether no rule is given.
    pub fn is_empty(&self) -> bool {
        Rule::ALL.iter().all(|r| self.count(*r).is_none())
    }

    /// Refuses a policy that would forget more than its writer can have meant: no rule at all,
    /// or a count of zero (only `--keep-last 0`, alone, forgets every snapshot).
    pub fn check(&self) -> Result<(), RepoError> {
        if self.is_empty() {
            return Err(RepoError::Invalid(
                "no retention rule given: say what to keep with --keep-last, --keep-hourly, \
                 --keep-daily, --keep-weekly, --keep-monthly or --keep-yearly (or --policy for \
                 the config's [retention]); to forget every snapshot, say --keep-last 0"
                    .into(),
            ));
        }
        for rule in Rule::ALL {
            if self.count(rule) != Some(0) {
                continue;
            }
            if rule != Rule::Last {
                return Err(RepoError::Invalid(format!(
                    "{} 0 keeps nothing: give a count of 1 or more, or leave the rule out",
                    rule.flag()
                )));
            }
            if Rule::ALL
                .iter()
                .any(|r| *r != Rule::Last && self.count(*r).is_some())
            {
                return Err(RepoError::Invalid(
                    "--keep-last 0 forgets every snapshot and goes alone; with other rules, \
                     leave --keep-last out"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// For one VM's snapshots (their times, in any order): why each is kept, in the order
    /// given; no reason means forget it. Ties in time are broken by position (later first).
    pub fn apply(&self, taken: &[Timestamp]) -> Vec<Vec<Reason>> {
        let mut order: Vec<usize> = (0..taken.len()).collect();
        order.sort_by(|a, b| taken[*b].cmp(&taken[*a]).then(b.cmp(a)));
        let mut out = vec![Vec::new(); taken.len()];
        for rule in Rule::ALL {
            let Some(mut left) = self.count(rule) else {
                continue;
            };
            let mut last: Option<String> = None;
            for &i in &order {
                if left == 0 {
                    break;
                }
                let period = rule.period(taken[i]);
                if rule != Rule::Last && period == last {
                    continue;
                }
                out[i].push(Reason {
                    rule,
                    period: period.clone(),
                });
                last = period;
                left -= 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    /// The kept snapshots' times, and the reasons, for a policy over `times`.
    fn kept(policy: &Policy, times: &[&str]) -> Vec<(String, String)> {
        let taken: Vec<Timestamp> = times.iter().map(|s| t(s)).collect();
        let verdicts = policy.apply(&taken);
        let mut out: Vec<(String, String)> = times
            .iter()
            .zip(verdicts)
            .filter(|(_, r)| !r.is_empty())
            .map(|(s, r)| {
                (
                    s.to_string(),
                    r.iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn periods_are_utc_calendar_periods() {
        let x = t("2028-02-29T23:59:59Z");
        assert_eq!(Rule::Hourly.period(x).unwrap(), "2028-02-29T23");
        assert_eq!(Rule::Daily.period(x).unwrap(), "2028-02-29");
        assert_eq!(Rule::Weekly.period(x).unwrap(), "2028-W09");
        assert_eq!(Rule::Monthly.period(x).unwrap(), "2028-02");
        assert_eq!(Rule::Yearly.period(x).unwrap(), "2028");
        // An offset is only another way to write the same instant: 01:30 at +02:00 is the
        // day before in UTC.
        let y = t("2027-01-01T01:30:00+02:00");
        assert_eq!(Rule::Daily.period(y).unwrap(), "2026-12-31");
        assert_eq!(Rule::Yearly.period(y).unwrap(), "2026");
        // ISO weeks: 2027-01-01 (a Friday) is in week 53 of 2026; 2024-12-30 (a Monday) in
        // week 1 of 2025.
        assert_eq!(
            Rule::Weekly.period(t("2027-01-01T12:00:00Z")).unwrap(),
            "2026-W53"
        );
        assert_eq!(
            Rule::Weekly.period(t("2024-12-30T00:00:00Z")).unwrap(),
            "2025-W01"
        );
        assert_eq!(
            Rule::Weekly.period(t("2024-12-29T23:59:59Z")).unwrap(),
            "2024-W52"
        );
    }

    #[test]
    fn each_rule_keeps_the_newest_of_each_of_its_last_n_periods() {
        let times = [
            "2026-12-06T10:00:00Z",
            "2026-12-06T10:30:00Z",
            "2026-12-06T11:15:00Z",
            "2026-12-06T23:59:59Z",
            "2026-12-07T00:00:00Z",
            "2026-12-05T08:00:00Z",
            "2026-11-30T08:00:00Z",
            "2026-11-29T08:00:00Z",
            "2025-12-31T23:00:00Z",
            "2024-02-29T12:00:00Z",
        ];
        let last = Policy {
            keep_last: Some(3),
            ..Default::default()
        };
        assert_eq!(
            kept(&last, &times),
            pairs(&[
                ("2026-12-07T00:00:00Z", "last"),
                ("2026-12-06T23:59:59Z", "last"),
                ("2026-12-06T11:15:00Z", "last"),
            ])
        );
        let hourly = Policy {
            keep_hourly: Some(4),
            ..Default::default()
        };
        // 10:00 and 10:30 share an hour: the newer one stands for it.
        assert_eq!(
            kept(&hourly, &times),
            pairs(&[
                ("2026-12-07T00:00:00Z", "hourly 2026-12-07T00"),
                ("2026-12-06T23:59:59Z", "hourly 2026-12-06T23"),
                ("2026-12-06T11:15:00Z", "hourly 2026-12-06T11"),
                ("2026-12-06T10:30:00Z", "hourly 2026-12-06T10"),
            ])
        );
        let daily = Policy {
            keep_daily: Some(3),
            ..Default::default()
        };
        // Periods without a snapshot do not count: 12-05's newest, not nothing for 12-04.
        assert_eq!(
            kept(&daily, &times),
            pairs(&[
                ("2026-12-07T00:00:00Z", "daily 2026-12-07"),
                ("2026-12-06T23:59:59Z", "daily 2026-12-06"),
                ("2026-12-05T08:00:00Z", "daily 2026-12-05"),
            ])
        );
        let weekly = Policy {
            keep_weekly: Some(3),
            ..Default::default()
        };
        // 11-30 is a Monday (week 49 with 12-06, a Sunday); 12-07 is the Monday of week 50;
        // 11-29 is the Sunday of week 48.
        assert_eq!(
            kept(&weekly, &times),
            pairs(&[
                ("2026-12-07T00:00:00Z", "weekly 2026-W50"),
                ("2026-12-06T23:59:59Z", "weekly 2026-W49"),
                ("2026-11-29T08:00:00Z", "weekly 2026-W48"),
            ])
        );
        let monthly_yearly = Policy {
            keep_monthly: Some(2),
            keep_yearly: Some(10),
            ..Default::default()
        };
        assert_eq!(
            kept(&monthly_yearly, &times),
            pairs(&[
                ("2026-12-07T00:00:00Z", "monthly 2026-12,yearly 2026"),
                ("2026-11-30T08:00:00Z", "monthly 2026-11"),
                ("2025-12-31T23:00:00Z", "yearly 2025"),
                ("2024-02-29T12:00:00Z", "yearly 2024"),
            ])
        );
    }

    #[test]
    fn rules_count_their_own_periods_and_fewer_snapshots_than_asked_are_all_kept() {
        let times = ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"];
        let p = Policy {
            keep_last: Some(1),
            keep_daily: Some(5),
            ..Default::default()
        };
        assert_eq!(
            kept(&p, &times),
            pairs(&[
                ("2026-01-02T00:00:00Z", "last,daily 2026-01-02"),
                ("2026-01-01T00:00:00Z", "daily 2026-01-01"),
            ])
        );
        let none = Policy {
            keep_last: Some(0),
            ..Default::default()
        };
        assert!(kept(&none, &times).is_empty());
        assert!(Policy::default().apply(&[]).is_empty());
    }

    #[test]
    fn same_second_snapshots_keep_the_later_listed_one() {
        let taken = [t("2026-01-01T00:00:00Z"), t("2026-01-01T00:00:00Z")];
        let p = Policy {
            keep_daily: Some(1),
            ..Default::default()
        };
        let v = p.apply(&taken);
        assert!(v[0].is_empty());
        assert_eq!(v[1].len(), 1);
    }

    #[test]
    fn bad_policies_are_refused_with_what_to_do() {
        let e = Policy::default().check().unwrap_err().to_string();
        assert!(e.contains("--keep-last 0"), "{e}");
        let zero = Policy {
            keep_daily: Some(0),
            ..Default::default()
        };
        let e = zero.check().unwrap_err().to_string();
        assert!(e.contains("--keep-daily 0"), "{e}");
        let mixed = Policy {
            keep_last: Some(0),
            keep_daily: Some(3),
            ..Default::default()
        };
        assert!(mixed.check().is_err());
        let all = Policy {
            keep_last: Some(0),
            ..Default::default()
        };
        assert!(all.check().is_ok());
    }
}
