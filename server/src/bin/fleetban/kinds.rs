//! The event kinds the CLI accepts (`fleetban events --kind`): exactly the
//! names of [`fleetban_proto::v1::EventKind::ALL`], the vocabulary agents
//! and the store use, so a typo fails at once with the list instead of
//! returning no events.

use clap::builder::PossibleValuesParser;
use fleetban_proto::v1::EventKind;

/// A parser that accepts the kind names and lists them in `--help` and in
/// the error for any other value.
pub fn parser() -> PossibleValuesParser {
    PossibleValuesParser::new(EventKind::ALL.map(EventKind::as_str))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::super::{Cli, Command};
    use fleetban_proto::v1::EventKind;

    #[test]
    fn a_bogus_kind_fails_listing_the_valid_ones() {
        let error = Cli::try_parse_from(["fleetban", "events", "--kind", "bogus"]).unwrap_err().to_string();
        assert!(error.contains("bogus"), "{error}");
        for kind in EventKind::ALL {
            assert!(error.contains(kind.as_str()), "{} missing from: {error}", kind.as_str());
        }
        let cli = Cli::try_parse_from(["fleetban", "events", "--kind", "auth_failed"]).unwrap();
        assert!(matches!(cli.command, Command::Events { kind: Some(ref k), .. } if k == "auth_failed"));
    }

    #[test]
    fn help_lists_the_kinds() {
        let mut command = Cli::command();
        let events = command.find_subcommand_mut("events").unwrap();
        let help = events.render_long_help().to_string();
        for kind in EventKind::ALL {
            assert!(help.contains(kind.as_str()), "{} missing from: {help}", kind.as_str());
        }
    }
}
