//! Names a client sends: what is one path component, and what may name a new file.

use super::DatastoreError;

/// Longest name accepted (NAME_MAX of common file systems).
pub const MAX_NAME: usize = 255;

/// Checks a name from a client: one path component, neither empty nor too long. A name that is
/// not UTF-8 passes (it is looked up, and not found).
pub fn check_name(name: &[u8]) -> Result<(), DatastoreError> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(DatastoreError::BadName);
    }
    if name.len() > MAX_NAME {
        return Err(DatastoreError::NameTooLong);
    }
    Ok(())
}

/// A name for a new file or folder, or the new name of a rename: one component, UTF-8 (the
/// namespace is stored as JSON), neither `.` nor `..` (which exist in every folder).
pub fn new_name(name: &[u8]) -> Result<String, DatastoreError> {
    check_name(name)?;
    let s = std::str::from_utf8(name)
        .map_err(|_| DatastoreError::Invalid("a new name must be UTF-8"))?;
    if is_dot(name) {
        return Err(DatastoreError::Exists);
    }
    Ok(s.to_string())
}

/// A name of an entry to remove or rename: one component, not `.` or `..`.
pub fn existing_name(name: &[u8]) -> Result<&[u8], DatastoreError> {
    check_name(name)?;
    if is_dot(name) {
        return Err(DatastoreError::Invalid(
            "`.` and `..` cannot be removed or renamed",
        ));
    }
    Ok(name)
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_single_components() {
        assert_eq!(check_name(b""), Err(DatastoreError::BadName));
        assert_eq!(check_name(b"a/b"), Err(DatastoreError::BadName));
        assert_eq!(
            check_name(b"../../etc/shadow"),
            Err(DatastoreError::BadName)
        );
        assert_eq!(check_name(b"a\0b"), Err(DatastoreError::BadName));
        assert_eq!(check_name(&[b'x'; 256]), Err(DatastoreError::NameTooLong));
        assert_eq!(check_name(&[b'x'; 255]), Ok(()));
        assert_eq!(check_name(b"web01-flat.vmdk"), Ok(()));
        assert_eq!(
            check_name(&[0xff, 0xfe]),
            Ok(()),
            "non-UTF-8 names are looked up (and not found)"
        );
    }

    #[test]
    fn new_names_are_utf8_and_not_dots() {
        assert_eq!(new_name(b"x.vmx~"), Ok("x.vmx~".to_string()));
        assert_eq!(new_name(b"."), Err(DatastoreError::Exists));
        assert_eq!(new_name(b".."), Err(DatastoreError::Exists));
        assert!(matches!(
            new_name(&[0xff, 0xfe]),
            Err(DatastoreError::Invalid(_))
        ));
        assert_eq!(new_name(b"a/b"), Err(DatastoreError::BadName));
        assert_eq!(new_name(&[b'x'; 256]), Err(DatastoreError::NameTooLong));
    }

    #[test]
    fn dots_cannot_be_removed_or_renamed() {
        assert!(matches!(
            existing_name(b"."),
            Err(DatastoreError::Invalid(_))
        ));
        assert!(matches!(
            existing_name(b".."),
            Err(DatastoreError::Invalid(_))
        ));
        assert_eq!(existing_name(b"..."), Ok(&b"..."[..]));
        assert_eq!(existing_name(b""), Err(DatastoreError::BadName));
    }
}
