//! Issue 26: a projection file runs as pgfold's role, so pgfold refuses to
//! start when the file or its directory could be changed by anyone but its own
//! user or root: writable by group or others, or owned by another user. What is
//! judged is what is opened, through symlinks. These tests run as root, so
//! another owner is uid 65534 (nobody).

use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::helpers::*;
use crate::sql_projections::footprint;

const NOBODY: u32 = 65534;

const PROJECTION: &str = r#"order = "set"
setup = "CREATE TABLE IF NOT EXISTS trusted (n bigint NOT NULL)"
tables = ["trusted"]
apply = "INSERT INTO trusted SELECT count(*) FROM batch"
"#;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_to(path: &Path, uid: u32) {
    chown(path, Some(uid), None).unwrap();
}

/// The in-process loader's error for `dir`, or `None` when it loads.
fn load_error(dir: &Path) -> Option<String> {
    pgfold::sql_projections::load(pgfold::projectors::builtin(), Some(dir))
        .err()
        .map(|e| format!("{e:#}"))
}

/// A directory only its owner may write, holding one safe projection file.
fn safe_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = write_projection(dir.path(), "trusted", PROJECTION);
    (dir, file)
}

#[test]
fn projection_files_and_directories_others_could_change_are_refused_naming_the_path() {
    // Safe as written: the check does not refuse what an operator installs.
    let (dir, _) = safe_dir();
    assert_eq!(load_error(dir.path()), None);

    // (the directory, not the file; a mode, or else an owner: NOBODY)
    let cases = [
        (
            false,
            Some(0o664),
            "writable by group or others (mode 0664)",
        ),
        (
            false,
            Some(0o646),
            "writable by group or others (mode 0646)",
        ),
        (true, Some(0o770), "writable by group or others (mode 0770)"),
        (
            true,
            Some(0o1777),
            "writable by group or others (mode 1777)",
        ),
        (false, None, "owned by uid 65534"),
        (true, None, "owned by uid 65534"),
    ];
    for (of_dir, mode, clue) in cases {
        let (dir, file) = safe_dir();
        let (spoilt, named) = match of_dir {
            true => (
                dir.path(),
                format!("daemon.projections_dir {}:", dir.path().display()),
            ),
            false => (file.as_path(), format!("{}:", file.display())),
        };
        match mode {
            Some(mode) => chmod(spoilt, mode),
            None => chown_to(spoilt, NOBODY),
        }
        let error = load_error(dir.path()).unwrap_or_else(|| panic!("{named} {clue}: loaded"));
        assert!(
            error.starts_with(&named) && error.contains(clue) && !error.contains('\n'),
            "{error}"
        );
    }
}

#[test]
fn through_symlinks_the_file_and_directory_actually_opened_are_judged() {
    // A link to a safe file in a safe directory loads.
    let (target, file) = safe_dir();
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("trusted.toml");
    symlink(&file, &link).unwrap();
    assert_eq!(load_error(links.path()), None);

    // The file it opens is group-writable: named as opened.
    chmod(&file, 0o664);
    let error = load_error(links.path()).expect("a group-writable target loaded");
    assert!(
        error.starts_with(&format!(
            "{} (opened as {}): writable by group or others",
            link.display(),
            file.display()
        )),
        "{error}"
    );
    chmod(&file, 0o644);

    // The directory it really lives in is writable by others: someone could
    // replace the file there, whatever the link's own directory allows.
    chmod(target.path(), 0o777);
    let error = load_error(links.path()).expect("a target in an open directory loaded");
    assert!(
        error.starts_with(&format!(
            "{}, the directory of {} (opened as {}): writable by group or others",
            target.path().display(),
            link.display(),
            file.display()
        )),
        "{error}"
    );
    chmod(target.path(), 0o700);

    // projections_dir itself a link, to a directory of another user.
    let (real, _) = safe_dir();
    let parent = tempfile::tempdir().unwrap();
    let dir_link = parent.path().join("projections");
    symlink(real.path(), &dir_link).unwrap();
    assert_eq!(load_error(&dir_link), None);
    chown_to(real.path(), NOBODY);
    let error = load_error(&dir_link).expect("a directory of another user loaded");
    assert!(
        error.starts_with(&format!(
            "daemon.projections_dir {} (opened as {}): owned by uid 65534",
            dir_link.display(),
            real.path().display()
        )),
        "{error}"
    );
}

/// Through the real binary: every command refuses to start, with one line, and
/// the database is left as it was.
#[tokio::test]
async fn pgfold_refuses_to_start_with_an_untrusted_projection_file_and_changes_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    pgfold_ok(&["migrate"], &[("DATABASE_URL", db.url.as_str())]);
    let before = footprint(&client).await;
    let (dir, file) = safe_dir();
    chmod(&file, 0o666);
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        (
            "PGFOLD_DAEMON__PROJECTIONS_DIR",
            dir.path().to_str().unwrap(),
        ),
    ];
    for args in [&["migrate"][..], &["run", "--once"], &["status"]] {
        let out = pgfold(args, &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: one line, got {stderr}"
        );
        assert!(
            stderr.contains(&format!("{}: writable by group or others", file.display())),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            footprint(&client).await,
            before,
            "{args:?} changed the database"
        );
    }
    // Made safe again, the same file is set up and run.
    chmod(&file, 0o644);
    pgfold_ok(&["migrate"], &env);
    pgfold_ok(&["run", "--once"], &env);
    assert_ne!(footprint(&client).await, before);
}
