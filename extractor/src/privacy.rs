//! Redaction of sensitive data before anything leaves the extractor (DESIGN.md
//! section 5). An organization's `privacy_settings` names the classes to
//! redact (`{"redact": ["card_number", "national_id", "email", "phone"]}`);
//! payment card numbers and US social security numbers are redacted whatever
//! the settings say, because storing them is never what anyone wants.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use elaaoms_shared::domain::{
    ExtractedMemory, MemoryContent, TranscriptTurn, MAX_MEMORY_CONTENT_CHARS,
};
use regex::{Captures, Regex};

/// One kind of sensitive data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RedactionClass {
    CardNumber,
    NationalId,
    Email,
    Phone,
}

impl RedactionClass {
    fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "card_number" | "card" | "payment_card" => Some(Self::CardNumber),
            "national_id" | "ssn" => Some(Self::NationalId),
            "email" => Some(Self::Email),
            "phone" | "phone_number" => Some(Self::Phone),
            _ => None,
        }
    }

    fn replacement(self) -> &'static str {
        match self {
            Self::CardNumber => "[redacted card number]",
            Self::NationalId => "[redacted national id]",
            Self::Email => "[redacted email]",
            Self::Phone => "[redacted phone number]",
        }
    }
}

/// What to redact for one organization and one caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivacyPolicy {
    classes: BTreeSet<RedactionClass>,
    /// The caller's own number (digits only) is theirs to give: kept.
    caller_digits: String,
}

impl PrivacyPolicy {
    /// The policy of an organization's `privacy_settings`; unknown class
    /// names are logged and ignored (a typo must not stop extraction, and the
    /// always-on classes still apply).
    pub fn from_settings(settings: &serde_json::Value, caller_id: &str) -> Self {
        let mut classes = BTreeSet::from([RedactionClass::CardNumber, RedactionClass::NationalId]);
        if let Some(names) = settings.get("redact").and_then(|value| value.as_array()) {
            for name in names {
                match name.as_str().and_then(RedactionClass::parse) {
                    Some(class) => {
                        classes.insert(class);
                    }
                    None => {
                        tracing::warn!(%name, "unknown redaction class in privacy_settings: ignored")
                    }
                }
            }
        }
        Self {
            classes,
            caller_digits: digits(caller_id),
        }
    }

    pub fn redacts(&self, class: RedactionClass) -> bool {
        self.classes.contains(&class)
    }

    /// `text` with every configured class replaced by its label.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        // Longest digit runs first, so a card number is never half-taken
        // for a phone number.
        if self.redacts(RedactionClass::CardNumber) {
            text = replace(&CARD, &text, |m| {
                luhn_valid(&digits(m)).then_some(RedactionClass::CardNumber)
            });
        }
        if self.redacts(RedactionClass::NationalId) {
            text = replace(&SSN, &text, |m| {
                valid_ssn(&digits(m)).then_some(RedactionClass::NationalId)
            });
            text = replace_spoken_ssn(&text);
        }
        if self.redacts(RedactionClass::Email) {
            text = replace(&EMAIL, &text, |_| Some(RedactionClass::Email));
        }
        if self.redacts(RedactionClass::Phone) {
            text = replace(&PHONE, &text, |m| {
                (!self.is_callers_number(m)).then_some(RedactionClass::Phone)
            });
        }
        text
    }

    fn is_callers_number(&self, number: &str) -> bool {
        let number = digits(number);
        let tail = |value: &str| {
            value
                .get(value.len().saturating_sub(10)..)
                .unwrap_or("")
                .to_owned()
        };
        !self.caller_digits.is_empty()
            && number.len() >= 7
            && tail(&number) == tail(&self.caller_digits)
    }

    /// A memory with its content and quote redacted. A label can be longer
    /// than what it replaces, so a content at the length limit is cut back
    /// to it: the unredacted text is never kept for want of room.
    pub fn redact_memory(&self, mut memory: ExtractedMemory) -> ExtractedMemory {
        let content = self.redact(memory.content.as_str());
        if content != memory.content.as_str() {
            let fitted: String = content.chars().take(MAX_MEMORY_CONTENT_CHARS).collect();
            // Cannot fail (the text starts with the original's first
            // character or a label); if it ever did, nothing is kept.
            memory.content = MemoryContent::new(fitted).unwrap_or_else(|_| {
                MemoryContent::new("[redacted]").expect("a constant valid content")
            });
        }
        memory.source_quote = memory.source_quote.map(|quote| self.redact(&quote));
        memory
    }

    /// The transcript's turns redacted, so a provider never sees what we
    /// would not store.
    pub fn redact_turns(&self, turns: &[TranscriptTurn]) -> Vec<TranscriptTurn> {
        turns
            .iter()
            .map(|turn| TranscriptTurn {
                message: self.redact(&turn.message),
                ..turn.clone()
            })
            .collect()
    }
}

/// 13 to 19 digits, optionally grouped by single spaces or dashes.
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").expect("valid regex"));
/// `123-45-6789` or `123 45 6789`.
static SSN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(?:\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4})\b").expect("valid regex")
});
/// Nine bare digits right after the words that announce a social security number.
static SSN_SPOKEN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?:social security(?: number)?|ssn|social)\D{0,20}\b(\d{9})\b")
        .expect("valid regex")
});
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
        .expect("valid regex")
});
/// North American numbers with or without the country code, and
/// international numbers written with a `+`.
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\b\d{3})[ .-]?\d{3}[ .-]?\d{4}\b|\+\d(?:[ .-]?\d){7,14}\b",
    )
    .expect("valid regex")
});

/// Replaces each match that `class_of` classifies; keeps the others.
fn replace(
    pattern: &Regex,
    text: &str,
    class_of: impl Fn(&str) -> Option<RedactionClass>,
) -> String {
    pattern
        .replace_all(text, |caps: &Captures| {
            let whole = &caps[0];
            class_of(whole).map_or_else(|| whole.to_owned(), |class| class.replacement().to_owned())
        })
        .into_owned()
}

/// The spoken form: keeps the announcing words, replaces the digits.
fn replace_spoken_ssn(text: &str) -> String {
    SSN_SPOKEN
        .replace_all(text, |caps: &Captures| {
            let (whole, number) = (caps.get(0).expect("match"), caps.get(1).expect("group"));
            format!(
                "{}{}",
                &whole.as_str()[..number.start() - whole.start()],
                RedactionClass::NationalId.replacement()
            )
        })
        .into_owned()
}

fn digits(text: &str) -> String {
    text.chars().filter(char::is_ascii_digit).collect()
}

/// The Luhn checksum that every payment card number satisfies.
pub fn luhn_valid(digits: &str) -> bool {
    if !(13..=19).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(index, byte)| {
            let digit = u32::from(byte - b'0');
            if index % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The SSA's rules: no area 000, 666 or 9xx, no group 00, no serial 0000.
fn valid_ssn(digits: &str) -> bool {
    if digits.len() != 9 {
        return false;
    }
    let (area, group, serial) = (&digits[..3], &digits[3..5], &digits[5..]);
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

#[cfg(test)]
mod tests {
    use super::*;
    use elaaoms_shared::domain::{Confidence, Importance, MemoryType};
    use serde_json::json;

    const CALLER: &str = "+14155550123";

    fn default_policy() -> PrivacyPolicy {
        PrivacyPolicy::from_settings(&json!({}), CALLER)
    }

    fn full_policy() -> PrivacyPolicy {
        PrivacyPolicy::from_settings(
            &json!({"redact": ["card_number", "national_id", "email", "phone"]}),
            CALLER,
        )
    }

    #[test]
    fn luhn_accepts_test_cards_and_rejects_near_misses() {
        assert!(luhn_valid("4111111111111111"));
        assert!(luhn_valid("5555555555554444"));
        assert!(luhn_valid("378282246310005")); // Amex, 15 digits
        assert!(!luhn_valid("4111111111111112"));
        assert!(!luhn_valid("411111111111")); // 12 digits
        assert!(!luhn_valid("41111111111111111111")); // 20 digits
    }

    #[test]
    fn card_numbers_are_always_redacted_in_any_grouping() {
        let policy = default_policy();
        for text in [
            "my card is 4111 1111 1111 1111, expiry next May",
            "my card is 4111-1111-1111-1111, expiry next May",
            "my card is 4111111111111111, expiry next May",
        ] {
            assert_eq!(
                policy.redact(text),
                "my card is [redacted card number], expiry next May"
            );
        }
        assert_eq!(
            policy.redact("Amex 3782 822463 10005 please"),
            "Amex [redacted card number] please"
        );
    }

    #[test]
    fn digit_runs_that_fail_luhn_are_kept() {
        let policy = default_policy();
        let text = "order number 4111 1111 1111 1112 arrived";
        assert_eq!(policy.redact(text), text);
    }

    #[test]
    fn social_security_numbers_are_always_redacted() {
        let policy = default_policy();
        assert_eq!(
            policy.redact("It's 123-45-6789."),
            "It's [redacted national id]."
        );
        assert_eq!(
            policy.redact("my social security number is 123456789"),
            "my social security number is [redacted national id]"
        );
        // Not valid SSNs: kept.
        assert_eq!(policy.redact("code 000-12-3456"), "code 000-12-3456");
        // Nine bare digits without the announcing words are not taken.
        assert_eq!(policy.redact("tracking 123456789"), "tracking 123456789");
    }

    #[test]
    fn email_and_phone_only_when_configured_and_never_the_callers_number() {
        let text = "Write to dana.ruiz@example.com or call my sister at (415) 555-0188; I'm on 415-555-0123.";
        assert_eq!(default_policy().redact(text), text);
        assert_eq!(
            full_policy().redact(text),
            "Write to [redacted email] or call my sister at [redacted phone number]; I'm on 415-555-0123."
        );
        assert_eq!(
            full_policy().redact("office +44 20 7946 0958"),
            "office [redacted phone number]"
        );
    }

    #[test]
    fn unknown_classes_are_ignored_and_the_defaults_stay() {
        let policy = PrivacyPolicy::from_settings(&json!({"redact": ["shoe_size", 3]}), CALLER);
        assert!(policy.redacts(RedactionClass::CardNumber));
        assert!(policy.redacts(RedactionClass::NationalId));
        assert!(!policy.redacts(RedactionClass::Email));
    }

    #[test]
    fn a_content_at_the_limit_is_cut_rather_than_left_unredacted() {
        let card = "4111111111111111 ";
        let text = card.repeat(MAX_MEMORY_CONTENT_CHARS / card.len());
        let memory = ExtractedMemory {
            content: MemoryContent::new(text).unwrap(),
            memory_type: MemoryType::Factual,
            importance: Importance::new(5).unwrap(),
            confidence: Confidence::new(0.9).unwrap(),
            source_quote: None,
        };
        let redacted = default_policy().redact_memory(memory);
        let content = redacted.content.as_str();
        assert!(content.chars().count() <= MAX_MEMORY_CONTENT_CHARS);
        assert!(content.starts_with("[redacted card number] "));
        assert!(!content.contains("4111"));
    }

    #[test]
    fn memories_are_redacted_in_content_and_quote() {
        let memory = ExtractedMemory {
            content: MemoryContent::new("The caller paid with card 4111 1111 1111 1111.").unwrap(),
            memory_type: MemoryType::Factual,
            importance: Importance::new(5).unwrap(),
            confidence: Confidence::new(0.9).unwrap(),
            source_quote: Some("use 4111-1111-1111-1111 again".to_owned()),
        };
        let redacted = default_policy().redact_memory(memory);
        assert_eq!(
            redacted.content.as_str(),
            "The caller paid with card [redacted card number]."
        );
        assert_eq!(
            redacted.source_quote.as_deref(),
            Some("use [redacted card number] again")
        );
    }
}
