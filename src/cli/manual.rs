//! The `pklock` command's manual: man pages (clap_mangen) and shell
//! completions (clap_complete), both made from its clap command, so that
//! they say what `--help` says. `pklock man --dir DIR` and `pklock
//! completions SHELL`; contrib/deb/build-deb puts them in the Debian package.

use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;
use clap_mangen::Man;

use super::{Failure, exit};

/// Writes `NAME.1` for `cmd` and `NAME-SUB.1` for each of its subcommands
/// that is not hidden, into `dir` (made if missing), and returns the files
/// written. A subcommand parsed apart from the others (as `pklock server`,
/// which takes none of the client's flags) is described by its own command
/// in `standalone`, in place of the one `cmd` holds.
pub fn write_man_pages(
    cmd: Command,
    standalone: &[Command],
    dir: &Path,
) -> Result<Vec<PathBuf>, Failure> {
    let cannot = |what: &Path, e: std::io::Error| {
        Failure::new(
            exit::CANT_CREATE,
            format!("cannot write {}: {e}", what.display()),
        )
    };
    std::fs::create_dir_all(dir).map_err(|e| cannot(dir, e))?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![Man::new(cmd.clone())];
    for sub in cmd.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let own = standalone
            .iter()
            .find(|own| own.get_bin_name() == sub.get_bin_name());
        pages.push(Man::new(own.unwrap_or(sub).clone()));
    }
    let mut written = Vec::with_capacity(pages.len());
    for page in pages {
        let path = dir.join(page.get_filename());
        page.generate_to(dir).map_err(|e| cannot(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// The completion script for `shell`, for a command installed as
/// `cmd`'s name.
pub fn completions(mut cmd: Command, shell: Shell) -> String {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    String::from_utf8_lossy(&script).into_owned()
}
