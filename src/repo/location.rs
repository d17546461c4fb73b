//! Where a repository lives: a local directory, or a bucket and prefix on S3-compatible object
//! storage. Parsed from what the operator types after `--repo` (or `repo =` in a config file).
//!
//! Accepted: a path (`/srv/backups`, `repo`), or `s3://BUCKET[/PREFIX]`. Anything else that looks
//! like a URL (`gs://`, `file://`, `http://`) is refused with an error naming the scheme, so a
//! typo never becomes a directory of that name.

use std::path::{Path, PathBuf};

use super::RepoError;

/// A repository's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    Dir(PathBuf),
    /// `prefix` has no leading or trailing `/`; empty for the bucket's top.
    S3 {
        bucket: String,
        prefix: String,
    },
}

impl RepoLocation {
    /// Parses `--repo`'s text.
    pub fn parse(text: &str) -> Result<RepoLocation, RepoError> {
        if text.is_empty() {
            return Err(RepoError::Invalid(
                "the repository is empty: give a directory or s3://BUCKET/PREFIX".into(),
            ));
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(RepoLocation::Dir(PathBuf::from(text)));
        };
        if scheme != "s3" {
            return Err(RepoError::Invalid(format!(
                "repository {text:?}: unknown URL scheme {scheme:?}; give a directory as a plain \
                 path or a bucket as s3://BUCKET/PREFIX"
            )));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(RepoError::Invalid(format!(
                "repository {text:?} names no bucket: write s3://BUCKET/PREFIX (a directory is \
                 given as a plain path, without s3://)"
            )));
        }
        check_bucket(bucket).map_err(|why| {
            RepoError::Invalid(format!("repository {text:?}: bucket {bucket:?} {why}"))
        })?;
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            check_prefix(prefix).map_err(|why| {
                RepoError::Invalid(format!("repository {text:?}: prefix {prefix:?} {why}"))
            })?;
        }
        Ok(RepoLocation::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The directory, for a local repository.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            RepoLocation::Dir(p) => Some(p),
            RepoLocation::S3 { .. } => None,
        }
    }
}

impl std::fmt::Display for RepoLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoLocation::Dir(p) => write!(f, "{}", p.display()),
            RepoLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl serde::Serialize for RepoLocation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// S3's bucket naming rules (3-63 of a-z 0-9 . -, starting and ending with a letter or digit).
fn check_bucket(bucket: &str) -> Result<(), &'static str> {
    if !(3..=63).contains(&bucket.len()) {
        return Err("must be 3 to 63 characters long");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err("may hold only lowercase letters, digits, '.' and '-'");
    }
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge(bucket.as_bytes()[0]) || !edge(bucket.as_bytes()[bucket.len() - 1]) {
        return Err("must start and end with a letter or a digit");
    }
    Ok(())
}

/// A prefix is `/`-separated plain names: no empty part, no `.` or `..`, no control characters,
/// no `?` or `#` (which would read as a query or fragment).
fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.len() > 512 {
        return Err("is longer than 512 bytes");
    }
    for part in prefix.split('/') {
        if part.is_empty() {
            return Err("has an empty part (\"//\")");
        }
        if part == "." || part == ".." {
            return Err("has a \".\" or \"..\" part");
        }
    }
    if prefix
        .chars()
        .any(|c| c.is_control() || c == '?' || c == '#' || c == '\\')
    {
        return Err("holds a control character, '?', '#' or '\\'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, prefix: &str) -> RepoLocation {
        RepoLocation::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn paths_and_s3_urls_parse() {
        let table = [
            ("/srv/repo", RepoLocation::Dir("/srv/repo".into())),
            ("repo", RepoLocation::Dir("repo".into())),
            ("s3://backups", s3("backups", "")),
            ("s3://backups/", s3("backups", "")),
            ("s3://backups/site-a/vms", s3("backups", "site-a/vms")),
            ("s3://backups/site-a/", s3("backups", "site-a")),
        ];
        for (text, want) in table {
            let got = RepoLocation::parse(text).unwrap();
            assert_eq!(got, want, "{text}");
        }
        assert_eq!(s3("b0b", "x/y").to_string(), "s3://b0b/x/y");
        assert_eq!(s3("b0b", "").to_string(), "s3://b0b");
    }

    #[test]
    fn bad_locations_are_refused_with_their_reason() {
        let table = [
            ("", "empty"),
            ("gs://bucket/x", "unknown URL scheme \"gs\""),
            ("file:///srv/repo", "unknown URL scheme \"file\""),
            ("s3:///srv/repo", "names no bucket"),
            ("s3://", "names no bucket"),
            ("s3://ab/x", "3 to 63"),
            ("s3://Backups/x", "lowercase"),
            ("s3://-bucket/x", "start and end"),
            ("s3://bucket//x", "empty part"),
            ("s3://bucket/a/../b", "\"..\""),
            ("s3://bucket/a?versionId=1", "'?'"),
        ];
        for (text, want) in table {
            let e = RepoLocation::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
