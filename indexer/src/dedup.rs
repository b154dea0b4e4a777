//! Stage 2 of deduplication in `rules` mode (DESIGN.md section 6): given a
//! new memory, one candidate and their cosine similarity, is the new memory
//! a **duplicate** (reinforce), a **conflict** (same subject and attribute,
//! another value: replace, keep the old one in `metadata.conflicts[]`) or
//! **distinct** (insert)?
//!
//! Cosine alone is wrong both ways on all-MiniLM-L6-v2 ("allergic to
//! penicillin" / "not allergic to penicillin" 0.93; "Priya is allergic" /
//! "Priya's son is allergic" 0.89), so these pure functions look at what the
//! embedding blurs: who the sentence is about, negation, numbers and times,
//! days, places and a few closed classes of values (colours, channels,
//! flavours, parts of the day). They never merge when they see a reason not
//! to; when they cannot tell, the similarity bar decides.

use std::collections::BTreeSet;

/// What stage 2 decided for one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Duplicate,
    Conflict,
    Distinct,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Duplicate => "duplicate",
            Decision::Conflict => "conflict",
            Decision::Distinct => "distinct",
        }
    }
}

/// Cosine similarity of two unit vectors (the embedder's are normalised),
/// summed in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// The bars of `rules` mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RulesThresholds {
    /// From here on, a pair with no reason to differ is the same fact (the seed's 0.85).
    pub duplicate: f64,
    /// A pair that differs in a value (negation, number, ...) is a conflict
    /// only when it is at least this similar: below, it is another fact.
    pub conflict: f64,
}

impl Default for RulesThresholds {
    fn default() -> Self {
        Self {
            duplicate: 0.85,
            conflict: 0.7,
        }
    }
}

/// Decides about `new` against the existing memory `existing`, whose
/// embeddings have cosine `similarity`.
pub fn judge(existing: &str, new: &str, similarity: f64, thresholds: RulesThresholds) -> Decision {
    let (existing, new) = (Features::of(existing), Features::of(new));
    if existing.subject.differs_from(&new.subject) {
        return Decision::Distinct;
    }
    if existing.disagrees_with(&new) {
        return if similarity >= thresholds.conflict {
            Decision::Conflict
        } else {
            Decision::Distinct
        };
    }
    if similarity >= thresholds.duplicate {
        Decision::Duplicate
    } else {
        Decision::Distinct
    }
}

/// Who a sentence is about, read from its leading noun phrase: "Priya's son
/// Kiran is ..." is about a son named Kiran whose possessor is Priya;
/// "Prefers ..." and "The caller ..." are about the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Subject {
    role: Option<&'static str>,
    name: Option<String>,
    possessor: Option<String>,
}

impl Subject {
    fn differs_from(&self, other: &Subject) -> bool {
        if let (Some(a), Some(b)) = (&self.name, &other.name) {
            // "Her sister Ana" and "her friend Ana" are two people too.
            let roles_differ =
                matches!((self.role, other.role), (Some(x), Some(y)) if !roles_compatible(x, y));
            return a != b || roles_differ;
        }
        match (self.role, other.role) {
            (Some(a), Some(b)) => !roles_compatible(a, b),
            (None, None) => false,
            (Some(_), None) => Self::role_against_plain(self, other),
            (None, Some(_)) => Self::role_against_plain(other, self),
        }
    }

    /// A relative or the agent against a sentence about the caller or a
    /// named person: different when the plain side is the caller, or is the
    /// relative's possessor ("Priya" against "Priya's son"). A named person
    /// against an unnamed relative ("Zuri" against "her youngest child")
    /// cannot be told apart by rules: not different.
    fn role_against_plain(with_role: &Subject, plain: &Subject) -> bool {
        match &plain.name {
            None => true,
            Some(name) => with_role.possessor.as_deref() == Some(name.as_str()),
        }
    }
}

/// Roles that make a sentence about someone other than the caller. Generic
/// words (child, parent, partner) are compatible with their specific ones.
const ROLES: &[(&str, &str)] = &[
    ("son", "child"),
    ("sons", "child"),
    ("daughter", "child"),
    ("daughters", "child"),
    ("child", "child"),
    ("children", "child"),
    ("kid", "child"),
    ("kids", "child"),
    ("baby", "child"),
    ("toddler", "child"),
    ("husband", "partner"),
    ("wife", "partner"),
    ("partner", "partner"),
    ("spouse", "partner"),
    ("fiance", "partner"),
    ("fiancee", "partner"),
    ("boyfriend", "partner"),
    ("girlfriend", "partner"),
    ("mother", "parent"),
    ("mom", "parent"),
    ("father", "parent"),
    ("dad", "parent"),
    ("parent", "parent"),
    ("parents", "parent"),
    ("motherinlaw", "inlaw"),
    ("fatherinlaw", "inlaw"),
    ("sisterinlaw", "inlaw"),
    ("brotherinlaw", "inlaw"),
    ("soninlaw", "inlaw"),
    ("daughterinlaw", "inlaw"),
    ("brother", "sibling"),
    ("sister", "sibling"),
    ("sibling", "sibling"),
    ("grandmother", "grandparent"),
    ("grandma", "grandparent"),
    ("grandfather", "grandparent"),
    ("grandpa", "grandparent"),
    ("grandson", "grandchild"),
    ("granddaughter", "grandchild"),
    ("aunt", "aunt"),
    ("uncle", "uncle"),
    ("niece", "niece"),
    ("nephew", "nephew"),
    ("cousin", "cousin"),
    ("friend", "friend"),
    ("neighbor", "neighbor"),
    ("neighbour", "neighbor"),
    ("roommate", "roommate"),
    ("boss", "colleague"),
    ("colleague", "colleague"),
    ("coworker", "colleague"),
    ("employer", "colleague"),
    ("dog", "pet"),
    ("cat", "pet"),
    ("pet", "pet"),
    ("agent", "agent"),
    ("assistant", "agent"),
    ("representative", "agent"),
    ("rep", "agent"),
    ("technician", "agent"),
    ("staff", "agent"),
    ("receptionist", "agent"),
    ("dentist", "agent"),
    ("hygienist", "agent"),
    ("doctor", "agent"),
    ("dr", "agent"),
];

/// Words that may sit inside a leading noun phrase without ending it.
const SUBJECT_FILLERS: &[&str] = &[
    "the", "a", "an", "her", "his", "their", "my", "our", "its", "s", "youngest", "oldest",
    "eldest", "older", "younger", "little", "elder", "teenage", "adult", "new", "late", "former",
    "first", "second", "other", "two", "caller", "customer", "client", "patient", "user",
];

fn role_of(word: &str) -> Option<&'static str> {
    ROLES.iter().find(|(w, _)| *w == word).map(|(w, _)| *w)
}

fn role_group(role: &str) -> &'static str {
    ROLES
        .iter()
        .find(|(w, _)| *w == role)
        .map_or("", |(_, group)| group)
}

/// Same word, or the same family where one side is generic ("daughter" and
/// "child"). "son" and "daughter" are different people.
fn roles_compatible(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let generic = |role: &str| {
        matches!(
            role,
            "child"
                | "children"
                | "kid"
                | "kids"
                | "parent"
                | "parents"
                | "partner"
                | "spouse"
                | "sibling"
                | "pet"
                | "baby"
        )
    };
    let group = role_group(a);
    group == role_group(b) && group != "agent" && (generic(a) || generic(b))
}

/// Capitalised words that are not names.
const NOT_NAMES: &[&str] = &[
    "the",
    "a",
    "an",
    "she",
    "he",
    "her",
    "his",
    "they",
    "their",
    "it",
    "its",
    "i",
    "caller",
    "customer",
    "client",
    "patient",
    "user",
    "prefers",
    "prefer",
    "wants",
    "likes",
    "loves",
    "hates",
    "has",
    "is",
    "was",
    "does",
    "did",
    "will",
    "would",
    "allergic",
    "works",
    "lives",
    "ordered",
    "booked",
    "complaint",
    "insurance",
    "internet",
    "needs",
    "called",
    "asked",
    "said",
    "mentioned",
    "reported",
    "paid",
    "uses",
    "owns",
    "drives",
    "must",
    "should",
    "cannot",
    "can",
    "no",
    "not",
    "never",
    "always",
    "usually",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "mondays",
    "tuesdays",
    "wednesdays",
    "thursdays",
    "fridays",
    "saturdays",
    "sundays",
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "thanksgiving",
    "christmas",
    "easter",
    "icu",
    "ppo",
    "hmo",
    "usd",
    "am",
    "pm",
    "mr",
    "mrs",
    "ms",
    "dr",
    "ok",
    "tv",
    "wifi",
    "visa",
    "mastercard",
    "amex",
    "email",
    "sms",
    "english",
    "spanish",
    "french",
    "german",
];

#[derive(Debug, Default)]
struct Features {
    subject: Subject,
    negated: bool,
    numbers: BTreeSet<i64>,
    /// Minutes after midnight.
    times: BTreeSet<i64>,
    days: BTreeSet<String>,
    /// Proper names other than the subject's: places, schools, doctors, pets.
    names: BTreeSet<String>,
    /// (class, value) of closed classes: colours, channels, flavours, ...
    values: ClassValues,
    /// Words of the antonym list that the sentence uses.
    opposites: BTreeSet<&'static str>,
    /// +1 likes, -1 dislikes, 0 neither or both.
    sentiment: i8,
}

/// One token of a sentence: its lowercase form and whether it was capitalised.
#[derive(Debug, Clone)]
struct Token {
    lower: String,
    capitalised: bool,
    /// Followed by a comma: "Daniel, her husband, ..." is an apposition.
    comma_after: bool,
}

const COMPOUNDS: &[(&str, &str)] = &[
    ("mother-in-law", "motherinlaw"),
    ("father-in-law", "fatherinlaw"),
    ("sister-in-law", "sisterinlaw"),
    ("brother-in-law", "brotherinlaw"),
    ("son-in-law", "soninlaw"),
    ("daughter-in-law", "daughterinlaw"),
    ("mother in law", "motherinlaw"),
    ("father in law", "fatherinlaw"),
    ("no longer", "nolonger"),
    ("rather than", "over"),
    ("instead of", "over"),
    ("e-mail", "email"),
    ("text message", "text"),
    ("phone call", "call"),
];

fn tokenize(text: &str) -> Vec<Token> {
    let mut text = text.replace(['\u{2019}', '\u{2018}'], "'");
    for (from, to) in COMPOUNDS {
        text = replace_case_insensitive(&text, from, to);
    }
    // "n't" negates; "'s" marks a possessor: keep both as tokens.
    let text = text.replace("n't", " not").replace("'s", " 's");
    let mut tokens = Vec::new();
    let mut current = String::new();
    let flush = |current: &mut String, tokens: &mut Vec<Token>| {
        if !current.is_empty() {
            let capitalised = current.chars().next().is_some_and(char::is_uppercase);
            tokens.push(Token {
                lower: current.to_lowercase(),
                capitalised,
                comma_after: false,
            });
            current.clear();
        }
    };
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let inside_number = (c == ':' || c == '.' || c == ',')
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if c.is_alphanumeric() || inside_number {
            current.push(c);
        } else if c == '\'' && chars.get(i + 1) == Some(&'s') {
            flush(&mut current, &mut tokens);
            current.push('\'');
        } else {
            flush(&mut current, &mut tokens);
            if c == ',' {
                if let Some(last) = tokens.last_mut() {
                    last.comma_after = true;
                }
            }
        }
    }
    flush(&mut current, &mut tokens);
    // "'s" became "'s" tokens; store them as "s" fillers.
    for token in &mut tokens {
        if token.lower == "'s" {
            token.lower = "s".to_owned();
            token.capitalised = false;
        }
    }
    tokens
}

fn replace_case_insensitive(text: &str, from: &str, to: &str) -> String {
    let lower = text.to_lowercase();
    if lower.len() != text.len() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, _) in lower.match_indices(from) {
        if start < last {
            continue;
        }
        out.push_str(&text[last..start]);
        let original = &text[start..start + from.len()];
        if original.chars().next().is_some_and(char::is_uppercase) {
            let mut chars = to.chars();
            if let Some(first) = chars.next() {
                out.extend(first.to_uppercase());
                out.push_str(chars.as_str());
            }
        } else {
            out.push_str(to);
        }
        last = start + from.len();
    }
    out.push_str(&text[last..]);
    out
}

fn is_name(token: &Token) -> bool {
    token.capitalised
        && token.lower.chars().all(char::is_alphabetic)
        && !NOT_NAMES.contains(&token.lower.as_str())
        && role_of(&token.lower).is_none()
}

/// A capitalised word is a name, except first in a sentence, where it may be
/// a verb with the caller left implicit ("Teaches middle school"): there it
/// is a name only when what follows reads like a verb or a possessive.
fn is_name_at(tokens: &[Token], i: usize) -> bool {
    if !is_name(&tokens[i]) {
        return false;
    }
    if i > 0 {
        return true;
    }
    tokens[i].comma_after
        || tokens.get(i + 1).is_some_and(|next| {
            let word = next.lower.as_str();
            word == "s"
                || word == "and"
                || is_name(next)
                || word.starts_with(|c: char| c.is_ascii_digit())
                || [
                    "is", "was", "has", "had", "does", "did", "will", "would", "can", "must",
                    "should", "may", "might", "prefer", "like", "love", "want", "need",
                ]
                .contains(&word)
                || ((word.ends_with('s') || word.ends_with("ed")) && !word.ends_with("ss"))
        })
}

fn leading_subject(tokens: &[Token]) -> Subject {
    let mut subject = Subject::default();
    let mut last_name: Option<String> = None;
    for (i, token) in tokens.iter().enumerate() {
        let word = token.lower.as_str();
        if let Some(role) = role_of(word) {
            // "Maya's daughter": Maya owns the daughter. "Dr Alvarez": a title.
            if tokens
                .get(i.wrapping_sub(1))
                .is_some_and(|t| t.lower == "s")
            {
                subject.possessor = last_name.take();
            }
            subject.role = Some(role);
            // "Daniel, her husband": an apposition names the relative.
            let apposition = i >= 2
                && tokens[..i]
                    .iter()
                    .rev()
                    .find(|t| is_name(t))
                    .is_some_and(|t| t.comma_after);
            if !apposition {
                subject.name = None;
            }
            last_name = None;
        } else if is_name_at(tokens, i) {
            subject.name = Some(word.to_owned());
            last_name = Some(word.to_owned());
        } else if !SUBJECT_FILLERS.contains(&word) {
            break;
        }
    }
    // A possessor with nothing owned ("Maya's order") is the subject itself.
    if subject.role.is_none() {
        subject.name = subject.name.or(last_name);
    }
    subject
}

const NUMBER_WORDS: &[(&str, i64)] = &[
    ("zero", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
    ("hundred", 100),
    ("dozen", 12),
    ("noon", -1),
    ("midnight", -2),
    ("first", 1),
    ("second", 2),
    ("third", 3),
    ("twice", 2),
    ("once", 1),
];

const NEGATIONS: &[&str] = &[
    "not", "never", "nolonger", "no", "none", "nobody", "nothing", "neither", "nor", "stopped",
    "quit", "anymore", "without",
];

const DAYS: &[(&str, &str)] = &[
    ("monday", "mon"),
    ("mondays", "mon"),
    ("tuesday", "tue"),
    ("tuesdays", "tue"),
    ("wednesday", "wed"),
    ("wednesdays", "wed"),
    ("thursday", "thu"),
    ("thursdays", "thu"),
    ("friday", "fri"),
    ("fridays", "fri"),
    ("saturday", "sat"),
    ("saturdays", "sat"),
    ("sunday", "sun"),
    ("sundays", "sun"),
    ("weekday", "weekday"),
    ("weekdays", "weekday"),
    ("weekend", "weekend"),
    ("weekends", "weekend"),
    ("january", "jan"),
    ("february", "feb"),
    ("march", "mar"),
    ("april", "apr"),
    ("june", "jun"),
    ("july", "jul"),
    ("august", "aug"),
    ("september", "sep"),
    ("october", "oct"),
    ("november", "nov"),
    ("december", "dec"),
];

/// Closed classes whose members are alternatives of one attribute.
const VALUE_CLASSES: &[(&str, &[&str])] = &[
    (
        "colour",
        &[
            "red", "orange", "yellow", "green", "blue", "purple", "pink", "black", "white", "grey",
            "gray", "brown", "teal", "gold", "silver",
        ],
    ),
    (
        "channel",
        &[
            "text",
            "texts",
            "sms",
            "email",
            "emails",
            "call",
            "calls",
            "phone",
            "voicemail",
            "letter",
            "mail",
            "whatsapp",
            "post",
        ],
    ),
    (
        "daypart",
        &[
            "morning",
            "mornings",
            "afternoon",
            "afternoons",
            "evening",
            "evenings",
            "night",
            "nights",
            "lunchtime",
        ],
    ),
    (
        "flavour",
        &[
            "lemon",
            "chocolate",
            "vanilla",
            "strawberry",
            "raspberry",
            "carrot",
            "coffee",
            "caramel",
            "coconut",
            "banana",
            "apple",
            "pumpkin",
            "cherry",
            "blueberry",
            "mint",
            "pistachio",
            "hazelnut",
        ],
    ),
    (
        "drink",
        &[
            "tea",
            "espresso",
            "latte",
            "cappuccino",
            "decaf",
            "juice",
            "water",
            "soda",
            "wine",
            "beer",
        ],
    ),
    (
        "diet",
        &[
            "vegan",
            "vegetarian",
            "pescatarian",
            "keto",
            "halal",
            "kosher",
            "gluten",
        ],
    ),
    (
        "payment",
        &[
            "cash",
            "card",
            "check",
            "cheque",
            "paypal",
            "visa",
            "mastercard",
            "amex",
            "invoice",
        ],
    ),
    ("seat", &["aisle", "window", "middle"]),
    (
        "size",
        &[
            "small", "medium", "large", "half", "full", "quarter", "single", "double", "queen",
            "king",
        ],
    ),
    (
        "language",
        &[
            "english",
            "spanish",
            "french",
            "german",
            "mandarin",
            "portuguese",
            "italian",
            "arabic",
            "hindi",
        ],
    ),
];

const LIKES: &[&str] = &[
    "likes",
    "like",
    "loves",
    "love",
    "enjoys",
    "enjoy",
    "prefers",
    "prefer",
    "favorite",
    "favourite",
    "wants",
    "fond",
];
const DISLIKES: &[&str] = &[
    "dislikes", "dislike", "hates", "hate", "avoids", "avoid", "detests", "cannot", "refuses",
];

/// Opposite values of one attribute.
const ANTONYMS: &[(&str, &str)] = &[
    ("lower", "upper"),
    ("left", "right"),
    ("day", "night"),
    ("days", "nights"),
    ("early", "late"),
    ("before", "after"),
    ("more", "less"),
    ("hot", "cold"),
    ("warm", "cold"),
    ("calm", "anxious"),
    ("calm", "nervous"),
    ("happy", "unhappy"),
    ("happy", "sad"),
    ("satisfied", "dissatisfied"),
    ("front", "back"),
    ("top", "bottom"),
    ("open", "closed"),
    ("open", "resolved"),
    ("with", "without"),
    ("allowed", "forbidden"),
    ("increase", "decrease"),
    ("increased", "decreased"),
    ("married", "divorced"),
    ("married", "single"),
    ("inside", "outside"),
    ("upstairs", "downstairs"),
    ("sweet", "savory"),
    ("sweet", "savoury"),
    ("spicy", "mild"),
    ("soft", "firm"),
    ("arrived", "missing"),
    ("working", "broken"),
    ("fixed", "broken"),
    ("buy", "sell"),
];

impl Features {
    fn of(text: &str) -> Features {
        let tokens = tokenize(text);
        let mut features = Features {
            subject: leading_subject(&tokens),
            ..Features::default()
        };
        let words: BTreeSet<&str> = tokens.iter().map(|t| t.lower.as_str()).collect();
        features.opposites = ANTONYMS
            .iter()
            .flat_map(|(a, b)| [(*a, *b), (*b, *a)])
            .filter(|(word, _)| words.contains(word))
            .map(|(word, _)| word)
            .collect();
        let (mut likes, mut dislikes) = (false, false);
        for (i, token) in tokens.iter().enumerate() {
            let word = token.lower.as_str();
            let next = tokens.get(i + 1).map(|t| t.lower.as_str());
            if NEGATIONS.contains(&word) {
                features.negated = true;
            }
            likes |= LIKES.contains(&word);
            dislikes |= DISLIKES.contains(&word);
            if let Some((_, day)) = DAYS.iter().find(|(w, _)| *w == word) {
                features.days.insert((*day).to_owned());
            }
            for (class, members) in VALUE_CLASSES {
                if members.contains(&word) {
                    features
                        .values
                        .insert((class, canonical_member(members, word)));
                }
            }
            if let Some(minutes) = time_of(word, next) {
                features.times.insert(minutes);
                continue;
            }
            if matches!(word, "am" | "pm") {
                continue;
            }
            if let Some(number) = number_of(word) {
                features.numbers.insert(number);
            }
            if is_name_at(&tokens, i) {
                features.names.insert(word.to_owned());
            }
        }
        // The subject's own names are who, not what.
        for name in [&features.subject.name, &features.subject.possessor]
            .into_iter()
            .flatten()
        {
            features.names.remove(name);
        }
        // "7 am" and "7:00" are one time, not a time and a number.
        features
            .numbers
            .retain(|n| !features.times.iter().any(|t| t / 60 == *n && t % 60 == 0));
        features.sentiment = match (likes, dislikes) {
            (true, false) => 1,
            (false, true) => -1,
            _ => 0,
        };
        features
    }

    /// Same subject, another value: negation, numbers, times, days, places,
    /// a closed-class value or liking turned into disliking.
    fn disagrees_with(&self, other: &Features) -> bool {
        self.negated != other.negated
            || each_has_its_own(&self.numbers, &other.numbers)
            || each_has_its_own(&self.times, &other.times)
            || each_has_its_own(&self.days, &other.days)
            || each_has_its_own(&self.names, &other.names)
            || ANTONYMS.iter().any(|(a, b)| {
                let (mine, theirs) = (&self.opposites, &other.opposites);
                (mine.contains(a) && theirs.contains(b) && !theirs.contains(a) && !mine.contains(b))
                    || (mine.contains(b)
                        && theirs.contains(a)
                        && !theirs.contains(b)
                        && !mine.contains(a))
            })
            || values_disagree(&self.values, &other.values)
            || self.sentiment * other.sentiment < 0
    }
}

/// Plurals and synonyms of a class member count as one value.
fn canonical_member(members: &'static [&'static str], word: &str) -> &'static str {
    let singular = word.strip_suffix('s').unwrap_or(word);
    let word = match singular {
        "sm" => "text",
        "phone" => "call",
        "gray" => "grey",
        "cheque" => "check",
        other => other,
    };
    members
        .iter()
        .copied()
        .find(|m| *m == word)
        .or_else(|| {
            members
                .iter()
                .copied()
                .find(|m| m.strip_suffix('s') == Some(word))
        })
        .unwrap_or(members[0])
}

/// Both sides say something the other does not: "8 am" against "5 pm"
/// disagrees; "a cake" against "a cake for $68" only adds a detail.
fn each_has_its_own<T: Ord>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> bool {
    !a.is_empty() && !b.is_empty() && !a.is_subset(b) && !b.is_subset(a)
}

type ClassValues = BTreeSet<(&'static str, &'static str)>;

fn values_disagree(a: &ClassValues, b: &ClassValues) -> bool {
    fn of(set: &ClassValues, class: &str) -> BTreeSet<&'static str> {
        set.iter()
            .filter(|(c, _)| *c == class)
            .map(|(_, v)| *v)
            .collect()
    }
    VALUE_CLASSES
        .iter()
        .any(|(class, _)| each_has_its_own(&of(a, class), &of(b, class)))
}

fn number_of(word: &str) -> Option<i64> {
    if let Some((_, n)) = NUMBER_WORDS.iter().find(|(w, _)| *w == word) {
        return Some(*n);
    }
    // "$68", "15th", "2,500", "3.5": digits count, separators dropped.
    let digits: String = word
        .trim_end_matches(|c: char| c.is_alphabetic())
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    if digits.is_empty() || !word.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let value: f64 = digits.parse().ok()?;
    Some((value * 100.0).round() as i64 / 100)
}

/// "8", "am" / "8am" / "08:00" / "4:30", "pm" / "noon" in minutes after midnight.
fn time_of(word: &str, next: Option<&str>) -> Option<i64> {
    match word {
        "noon" | "midday" => return Some(12 * 60),
        "midnight" => return Some(0),
        _ => {}
    }
    let (body, suffix) = if let Some(body) = word.strip_suffix("am") {
        (body, Some("am"))
    } else if let Some(body) = word.strip_suffix("pm") {
        (body, Some("pm"))
    } else {
        (word, next.filter(|n| matches!(*n, "am" | "pm")))
    };
    let (hours, minutes) = match body.split_once(':') {
        Some((h, m)) => (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?),
        None if suffix.is_some() => (body.parse::<i64>().ok()?, 0),
        None => return None,
    };
    if !(0..=24).contains(&hours) || !(0..60).contains(&minutes) {
        return None;
    }
    let hours = match suffix {
        Some("pm") if hours < 12 => hours + 12,
        Some("am") if hours == 12 => 0,
        _ => hours,
    };
    Some(hours * 60 + minutes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(existing: &str, new: &str, similarity: f64) -> Decision {
        judge(existing, new, similarity, RulesThresholds::default())
    }

    #[test]
    fn the_measured_pairs_of_the_design() {
        assert_eq!(
            decide(
                "Priya is allergic to penicillin",
                "Priya is not allergic to penicillin",
                0.93
            ),
            Decision::Conflict
        );
        assert_eq!(
            decide(
                "Priya is allergic to penicillin",
                "Priya's son is allergic to penicillin",
                0.89
            ),
            Decision::Distinct
        );
        assert_eq!(
            decide(
                "Prefers appointments at 8 am",
                "Prefers appointments at 5 pm",
                0.93
            ),
            Decision::Conflict
        );
    }

    #[test]
    fn same_fact_above_the_bar_is_a_duplicate_and_below_it_distinct() {
        let (a, b) = (
            "Zuri has a severe tree nut allergy",
            "Zuri is severely allergic to tree nuts",
        );
        assert_eq!(decide(a, b, 0.86), Decision::Duplicate);
        assert_eq!(decide(a, b, 0.85), Decision::Duplicate);
        assert_eq!(decide(a, b, 0.84), Decision::Distinct);
    }

    #[test]
    fn a_value_change_below_the_conflict_bar_is_another_fact() {
        assert_eq!(
            decide("Ordered a cake for $68", "Ordered pies for $74", 0.65),
            Decision::Distinct
        );
        assert_eq!(
            decide("Ordered a cake for $68", "Ordered a cake for $74", 0.90),
            Decision::Conflict
        );
    }

    #[test]
    fn negation_markers() {
        for negated in [
            "Maya no longer eats gluten",
            "Maya doesn't eat gluten",
            "Maya never eats gluten",
            "Maya does not eat gluten",
        ] {
            assert_eq!(
                decide("Maya eats gluten", negated, 0.9),
                Decision::Conflict,
                "{negated}"
            );
        }
    }

    #[test]
    fn times_in_other_notations_agree() {
        assert_eq!(
            decide("Pickup is at 4 pm", "Pickup is at 16:00", 0.9),
            Decision::Duplicate
        );
        assert_eq!(
            decide("Pickup is at 4pm", "Pickup is at 4:30 pm", 0.9),
            Decision::Conflict
        );
        assert_eq!(
            decide(
                "Zuri turns seven on 15 November",
                "Zuri turns 7 on November 15th",
                0.9
            ),
            Decision::Duplicate
        );
    }

    #[test]
    fn a_detail_added_is_not_a_conflict() {
        assert_eq!(
            decide(
                "Ordered a half-sheet cake",
                "Ordered a half-sheet cake for $68",
                0.9
            ),
            Decision::Duplicate
        );
    }

    #[test]
    fn other_people_are_distinct() {
        assert_eq!(
            decide(
                "Prefers morning appointments",
                "Her husband prefers morning appointments",
                0.9
            ),
            Decision::Distinct
        );
        assert_eq!(
            decide(
                "Kiran is overdue for a cleaning",
                "Priya is overdue for a cleaning",
                0.9
            ),
            Decision::Distinct
        );
        assert_eq!(
            decide(
                "Maya's mother-in-law Grace is diabetic",
                "Maya is diabetic",
                0.88
            ),
            Decision::Distinct
        );
        assert_eq!(
            decide(
                "The caller promised to send the forms",
                "The agent promised to send the forms",
                0.95
            ),
            Decision::Distinct
        );
        assert_eq!(
            decide(
                "Maya's son is allergic to nuts",
                "Maya's daughter is allergic to nuts",
                0.95
            ),
            Decision::Distinct
        );
    }

    #[test]
    fn the_same_person_named_or_not_is_not_another_subject() {
        assert_eq!(
            decide(
                "Maya's daughter Zuri has a severe nut allergy",
                "Zuri has a severe nut allergy",
                0.9
            ),
            Decision::Duplicate
        );
        assert_eq!(
            decide(
                "Husband Daniel picks up the orders",
                "Daniel picks up the orders",
                0.9
            ),
            Decision::Duplicate
        );
        assert_eq!(
            decide("Maya prefers lemon sponge", "Prefers lemon sponge", 0.9),
            Decision::Duplicate
        );
        assert_eq!(
            decide("Her daughter loves purple", "Her child loves purple", 0.9),
            Decision::Duplicate
        );
    }

    #[test]
    fn places_and_closed_class_values() {
        assert_eq!(
            decide("Lives on Maple Street", "Lives on Oak Street", 0.9),
            Decision::Conflict
        );
        assert_eq!(
            decide(
                "Grace is visiting from Atlanta",
                "Grace is visiting from Denver",
                0.9
            ),
            Decision::Conflict
        );
        assert_eq!(
            decide("Prefers text messages", "Prefers email", 0.86),
            Decision::Conflict
        );
        assert_eq!(
            decide("Zuri loves purple", "Zuri loves pink", 0.9),
            Decision::Conflict
        );
        assert_eq!(
            decide("Maya loves marzipan", "Maya hates marzipan", 0.9),
            Decision::Conflict
        );
        assert_eq!(
            decide(
                "Technician visits on Thursdays only",
                "Technician visits on Mondays only",
                0.9
            ),
            Decision::Conflict
        );
    }

    #[test]
    fn tokens_and_times() {
        assert_eq!(time_of("8", Some("am")), Some(480));
        assert_eq!(time_of("08:00", None), Some(480));
        assert_eq!(time_of("5pm", None), Some(1020));
        assert_eq!(time_of("12", Some("am")), Some(0));
        assert_eq!(time_of("8", None), None);
        assert_eq!(number_of("68"), Some(68));
        assert_eq!(number_of("15th"), Some(15));
        assert_eq!(number_of("2,500"), Some(2500));
    }
}
