//! `presenced-assets OUT_DIR`: writes the man pages (`OUT_DIR/man/*.1`, one
//! per command and subcommand) and shell completions (`OUT_DIR/completions/`,
//! bash, zsh and fish) of `presenced` and `presencectl`. A build-time tool
//! for the Debian package (`packaging/assets.sh`); it is not installed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::{generate_to, Shell};
use presenced::ops::cli::{ctl::CtlCli, daemon::Cli};

fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: presenced-assets OUT_DIR")?;
    for cmd in [Cli::command(), CtlCli::command()] {
        write_man_pages(&cmd, &out.join("man"))?;
        write_completions(cmd, &out.join("completions"))?;
    }
    Ok(())
}

/// `NAME.1` for the command and `NAME-SUB.1` for each visible subcommand,
/// recursively.
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd.clone(), dir).with_context(|| {
        format!(
            "writing man pages of {} to {}",
            cmd.get_name(),
            dir.display()
        )
    })
}

fn write_completions(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = cmd.get_name().to_string();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = generate_to(shell, &mut cmd, &name, dir)
            .with_context(|| format!("writing {shell} completion of {name}"))?;
        // bash-completion looks the file up by the command's name.
        if shell == Shell::Bash {
            let plain = dir.join(format!("{name}.bash"));
            if path != plain {
                std::fs::rename(&path, &plain)?;
            }
        }
    }
    Ok(())
}
