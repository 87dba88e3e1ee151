//! Why a file was not classified: one [`FailureCode`] for the server's codes and the
//! client's own.
//!
//! A failure code travels far: it is printed (`name  ✗  CODE: reason`), written to the
//! results file (`error_code`), shown in the HTML report, names the `_errors/<code>`
//! folder of `--sort-into`, and is read back by `--resume`, which decides from it
//! whether the file is sent again ([`FailureCode::is_final`]). The strings are part of
//! that contract: [`FailureCode::as_str`] gives exactly the names the files hold, and
//! parsing them back gives the same value.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use classifier_proto::ErrorCode;

/// Why a file has no classification: the code a server answered with, or one the client
/// gave it itself (the file was never sent, or the reply made no sense).
///
/// Exists so that every place that writes, reads or decides on a code uses one type
/// instead of spelling its strings again; [`FailureCode::Other`] keeps codes this build
/// does not know (a newer server's number, a row written by another version) as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FailureCode {
    /// The server's answer (`ClassifyError::code`), shown by its proto name
    /// (`CORRUPT_IMAGE`, `INTERNAL`, …).
    Server(ErrorCode),
    /// Not sent: the file is larger than the client reads, or its request larger than
    /// the broker takes, even downscaled (`FILE_TOO_LARGE`).
    FileTooLarge,
    /// Not sent: the file could not be read, or is no longer a regular file
    /// (`UNREADABLE_FILE`).
    UnreadableFile,
    /// The server's reply carried neither predictions nor an error
    /// (`MALFORMED_RESPONSE`).
    MalformedResponse,
    /// Any other code, kept as written: a server code number this build does not know
    /// (`ERROR_<n>`) or a code read back from a results file of another version. Never
    /// one of the names above (parsing gives those their own variant).
    Other(String),
}

/// The client's own codes, which parsing looks for by their names.
const CLIENT_CODES: [FailureCode; 3] = [
    FailureCode::FileTooLarge,
    FailureCode::UnreadableFile,
    FailureCode::MalformedResponse,
];

impl FailureCode {
    /// The code a server's `ClassifyError::code` number stands for; a number this build
    /// does not know becomes `ERROR_<n>`.
    pub fn from_server(code: i32) -> FailureCode {
        ErrorCode::try_from(code)
            .map(FailureCode::Server)
            .unwrap_or_else(|_| FailureCode::Other(format!("ERROR_{code}")))
    }

    /// The code's name as printed and written to results files (`CORRUPT_IMAGE`,
    /// `FILE_TOO_LARGE`, …).
    pub fn as_str(&self) -> &str {
        match self {
            FailureCode::Server(code) => code.as_str_name(),
            FailureCode::FileTooLarge => "FILE_TOO_LARGE",
            FailureCode::UnreadableFile => "UNREADABLE_FILE",
            FailureCode::MalformedResponse => "MALFORMED_RESPONSE",
            FailureCode::Other(name) => name,
        }
    }

    /// Whether the code depends only on the file's bytes, so sending the same file again
    /// would get the same answer: `--resume` then counts the file as answered. Transient
    /// and client-side codes (`INTERNAL`, `UNKNOWN_MODEL`, `UNREADABLE_FILE`,
    /// `FILE_TOO_LARGE`, which `--resize-to` may cure, …) are retried.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            FailureCode::Server(
                ErrorCode::UnsupportedFormat
                    | ErrorCode::CorruptImage
                    | ErrorCode::EmptyImage
                    | ErrorCode::ImageTooLarge
                    | ErrorCode::MessageTooLarge
            )
        )
    }
}

impl From<ErrorCode> for FailureCode {
    fn from(code: ErrorCode) -> Self {
        FailureCode::Server(code)
    }
}

impl fmt::Display for FailureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for FailureCode {
    type Err = Infallible;

    /// Reads a name as [`FailureCode::as_str`] writes it; any other string is kept as
    /// [`FailureCode::Other`], so nothing a results file holds is lost.
    fn from_str(name: &str) -> Result<Self, Infallible> {
        let own = CLIENT_CODES
            .iter()
            .find(|own| own.as_str() == name)
            .cloned();
        Ok(own
            .or_else(|| ErrorCode::from_str_name(name).map(FailureCode::Server))
            .unwrap_or_else(|| FailureCode::Other(name.to_string())))
    }
}

impl From<&str> for FailureCode {
    /// Parses `name` (see [`FromStr`]); never fails.
    fn from(name: &str) -> Self {
        match name.parse() {
            Ok(code) => code,
            Err(never) => match never {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every server code and every client code is written as today's string and read
    /// back as the same value.
    #[test]
    fn names_are_todays_strings_and_parse_back() {
        let mut names = Vec::new();
        for number in 0..=9 {
            let code = FailureCode::from_server(number);
            assert!(matches!(code, FailureCode::Server(_)), "{code:?}");
            assert_eq!(FailureCode::from(code.as_str()), code);
            names.push(code.to_string());
        }
        assert_eq!(
            names,
            [
                "ERROR_CODE_UNSPECIFIED",
                "MALFORMED_REQUEST",
                "UNSUPPORTED_FORMAT",
                "CORRUPT_IMAGE",
                "IMAGE_TOO_LARGE",
                "MESSAGE_TOO_LARGE",
                "EMPTY_IMAGE",
                "INTERNAL",
                "UNKNOWN_MODEL",
                "UNROUTABLE",
            ]
        );
        for (code, name) in [
            (FailureCode::FileTooLarge, "FILE_TOO_LARGE"),
            (FailureCode::UnreadableFile, "UNREADABLE_FILE"),
            (FailureCode::MalformedResponse, "MALFORMED_RESPONSE"),
        ] {
            assert_eq!(code.as_str(), name);
            assert_eq!(format!("{code}"), name);
            assert_eq!(name.parse::<FailureCode>(), Ok(code));
        }
    }

    /// A server number this build does not know is `ERROR_<n>`, and reads back as the
    /// same value; any other string is kept as it is.
    #[test]
    fn unknown_codes_are_kept_as_written() {
        let unknown = FailureCode::from_server(42);
        assert_eq!(unknown.as_str(), "ERROR_42");
        assert_eq!(FailureCode::from("ERROR_42"), unknown);
        let old = FailureCode::from("TIMEOUT");
        assert_eq!(old, FailureCode::Other("TIMEOUT".into()));
        assert_eq!(old.to_string(), "TIMEOUT");
        assert_eq!(FailureCode::from("").as_str(), "");
        assert_eq!(format!("[{:<8}]", FailureCode::from("AB")), "[AB      ]");
    }

    /// Only codes that depend on the file's bytes alone are final for `--resume`.
    #[test]
    fn only_content_errors_are_final() {
        let finals: Vec<String> = (0..=9)
            .map(FailureCode::from_server)
            .filter(FailureCode::is_final)
            .map(|code| code.to_string())
            .collect();
        assert_eq!(
            finals,
            [
                "UNSUPPORTED_FORMAT",
                "CORRUPT_IMAGE",
                "IMAGE_TOO_LARGE",
                "MESSAGE_TOO_LARGE",
                "EMPTY_IMAGE",
            ]
        );
        for own in [
            "FILE_TOO_LARGE",
            "UNREADABLE_FILE",
            "MALFORMED_RESPONSE",
            "X",
        ] {
            assert!(!FailureCode::from(own).is_final(), "{own}");
        }
    }
}
