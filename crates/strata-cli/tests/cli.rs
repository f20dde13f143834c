//! Runs the `strata` binary and checks what it prints.

use std::process::{Command, Output};

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata")).args(args).output().expect("the strata binary runs")
}

#[test]
fn version_names_the_package_version() {
    let out = strata(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("strata {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn help_says_no_subcommands_exist_yet() {
    let out = strata(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: strata"), "{help}");
    assert!(help.contains("No subcommands are implemented yet"), "{help}");
}

#[test]
fn no_arguments_print_help_and_fail() {
    let out = strata(&[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: strata"), "{out:?}");
}

#[test]
fn unknown_subcommands_are_rejected() {
    let out = strata(&["generate"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument"), "{out:?}");
}
