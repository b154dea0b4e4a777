//! The deterministic offline `rules` extractor: the embedded default that
//! lets the pipeline run with no LLM, no key and no network.
//!
//! It reads only the caller's (`Speaker::User`) turns, splits them into
//! sentences and groups sentences that belong together (a sentence that
//! starts with a pronoun such as "She ..." or "It's ...", or with "So", joins
//! the one before; so does a very short one like "I mean it.", and the
//! answer after a question). Each group is matched against [`RULES`], a
//! table of keyword rules in priority order; the first rule that matches
//! decides the memory's type, importance and confidence. One group gives at
//! most one memory. The caller's name is looked for separately, so "This is
//! Tom, my internet keeps dropping" gives the name and the issue.
//!
//! What it finds:
//! * the caller's name: "my name is X", "name's X", "call me X"; "this is
//!   X", "it's X", "I'm X" in the caller's first turn; the answer to an
//!   agent's question for a name ("Sure. Maya Okafor."); a sentence that is
//!   nothing but a two- or three-word name ("Priya Raman."). One name per
//!   transcript, the longest found: factual, importance 6, content
//!   "Caller's name is X";
//! * allergies (factual 9-10), other health notes (factual 7), a relative
//!   together with a health or safety note such as a medical alert device
//!   (relationship 9);
//! * threats to cancel or switch provider and pain (issue 8), recurring
//!   problems (issue 7), complaints (issue 6), a complaint said to be better
//!   now (issue 3);
//! * family and relationships, "my daughter", "my husband Daniel", ...
//!   (relationship 6);
//! * contact preferences (preference 7), including a one-word answer to the
//!   agent's "by email or by text?"; other preferences (preference 6);
//! * work and occupation (factual 5), how long they have been a customer
//!   (factual 3);
//! * emotions the caller states about themselves (emotion 4-6).
//!
//! Content is the caller's own words rewritten into the third person ("I
//! work from home" becomes "The caller works from home"); when the words
//! have no first person, "The caller says: " is put in front. When a
//! sentence points back ("... about that combination") and the sentence
//! before it produced nothing, that sentence is kept as context. The
//! caller's exact words go to `source_quote`. Confidence is 0.6-0.8: rules
//! are less sure than a model.
//!
//! What it cannot do:
//! * understand: matching is by keyword, so "the text on the cake" reads as
//!   a contact preference, and negation is not understood ("no swelling" still
//!   mentions swelling; only "not allergic"/"no allergies" are excluded);
//! * resolve references beyond the neighbouring sentence, or across turns
//!   (that "Daniel" in a later call is the husband is not known);
//! * read meaning it is not told in words: frustration shown only in tone,
//!   the agent's summary, or a fact the agent states and the caller confirms
//!   with "yes" (agent turns never become memories; only the agent's words
//!   just before a caller turn are looked at, to recognise the answer to
//!   "your name?" or "email or text?");
//! * extract orders, dates, prices or amounts as such, or decide that an
//!   earlier issue is resolved beyond "better than"/"fixed" wording;
//! * handle languages other than English. Verb agreement in the rewrite is a
//!   heuristic ("I read" becomes "reads" even when it was past tense).
//!
//! It never reads tool calls: it only sees `TranscriptTurn::message`, skips
//! empty messages and a caller message that looks like JSON. A one-word
//! group ("Text.") gives nothing unless it names an allergy or a health
//! condition.

use std::collections::BTreeSet;

use elaaoms_shared::domain::{
    Confidence, ExtractedMemory, Importance, MemoryContent, MemoryType, Speaker, TranscriptTurn,
    MAX_MEMORY_CONTENT_CHARS,
};

/// One keyword rule. A group of sentences matches when it contains one of
/// `any`, one of `also_any` (when that list is not empty) and none of
/// `unless`. A phrase is words separated by single spaces, matched as whole
/// words (case-insensitive, "daughter" also matches "daughter's"); a word
/// ending in `*` matches any word with that beginning.
pub struct Rule {
    pub category: &'static str,
    pub any: &'static [&'static str],
    pub also_any: &'static [&'static str],
    pub unless: &'static [&'static str],
    pub memory_type: MemoryType,
    pub importance: i64,
    pub confidence: f64,
}

const NONE: &[&str] = &[];

/// The rules, highest priority first.
#[rustfmt::skip]
pub const RULES: &[Rule] = &[
    Rule {
        category: "allergy",
        any: &["allerg*", "anaphyla*", "epipen*", "epi pen*", "coeliac", "celiac"],
        also_any: NONE,
        unless: NOT_ALLERGIC,
        memory_type: MemoryType::Factual,
        importance: 10,
        confidence: 0.8,
    },
    Rule {
        category: "allergen to avoid",
        any: ALLERGENS,
        also_any: AVOIDANCE,
        unless: NOT_ALLERGIC,
        memory_type: MemoryType::Factual,
        importance: 9,
        confidence: 0.65,
    },
    Rule {
        category: "relative's health or safety",
        any: RELATIVES,
        also_any: HEALTH,
        unless: NONE,
        memory_type: MemoryType::Relationship,
        importance: 9,
        confidence: 0.7,
    },
    Rule {
        category: "health",
        any: HEALTH,
        also_any: NONE,
        unless: NONE,
        memory_type: MemoryType::Factual,
        importance: 7,
        confidence: 0.75,
    },
    Rule {
        category: "threat to cancel or switch",
        any: &["cancel*", "switch*", "leave", "leaving"],
        also_any: &[
            "provider*", "service", "account", "contract", "subscription", "membership",
            "elsewhere", "competitor*", "another company", "business",
        ],
        unless: NONE,
        memory_type: MemoryType::Issue,
        importance: 8,
        confidence: 0.75,
    },
    Rule {
        category: "pain",
        any: &[
            "pain", "pains", "painful", "hurts", "hurting", "ache", "aches", "aching",
            "toothache", "headache", "throbbing", "sore", "bleeding",
        ],
        also_any: NONE,
        unless: NONE,
        memory_type: MemoryType::Issue,
        importance: 8,
        confidence: 0.7,
    },
    Rule {
        category: "relationship",
        any: RELATIVES,
        also_any: NONE,
        unless: NONE,
        memory_type: MemoryType::Relationship,
        importance: 6,
        confidence: 0.75,
    },
    Rule {
        category: "issue said to be better now",
        any: ISSUES,
        also_any: &[
            "better", "fixed", "resolved", "sorted", "perfect", "works now", "working again",
            "good again", "great again",
        ],
        unless: &["not fixed", "isn't fixed", "still"],
        memory_type: MemoryType::Issue,
        importance: 3,
        confidence: 0.6,
    },
    Rule {
        category: "recurring issue",
        any: &[
            "keeps", "keep dropping", "again and again", "every single", "second time",
            "third time", "fourth time", "fifth time", "repeatedly", "every time", "still not",
            "still isn't", "still hasn't", "calling back",
        ],
        also_any: NONE,
        unless: NONE,
        memory_type: MemoryType::Issue,
        importance: 7,
        confidence: 0.7,
    },
    Rule {
        category: "complaint or issue",
        any: ISSUES,
        also_any: NONE,
        unless: &["no problem", "not a problem", "no problems"],
        memory_type: MemoryType::Issue,
        importance: 6,
        confidence: 0.7,
    },
    Rule {
        category: "contact preference",
        any: &[
            "text", "texts", "texting", "text message*", "sms", "email*", "e mail", "voicemail",
            "call me", "call my", "don't call", "dont call", "do not call", "never call",
            "no calls", "reach me", "contact me", "phone me",
        ],
        also_any: NONE,
        unless: NONE,
        memory_type: MemoryType::Preference,
        importance: 7,
        confidence: 0.75,
    },
    Rule {
        category: "preference",
        any: &[
            "prefer*", "favorite*", "favourite*", "love", "loves", "loved", "i like", "we like",
            "really like", "likes", "i'd like", "i would like", "rather", "crazy about",
            "fan of", "go easy on", "less sugar", "less sweet", "too sweet", "sugary",
            "has to be", "have to be", "works best", "ideal", "hate", "hates", "can't stand",
            "don't like", "dislike*", "only on",
        ],
        also_any: NONE,
        unless: NONE,
        memory_type: MemoryType::Preference,
        importance: 6,
        confidence: 0.7,
    },
    Rule {
        category: "work",
        any: &[
            "i work", "i teach", "work from home", "working from home", "my job", "my shift",
            "night shift*", "on nights", "my boss", "my office", "my clients", "my students",
            "nurse", "teacher", "interpreter", "engineer", "freelance*", "retired",
            "self employed",
        ],
        also_any: NONE,
        unless: NONE,
        memory_type: MemoryType::Factual,
        importance: 5,
        confidence: 0.7,
    },
    Rule {
        category: "customer since",
        any: &[
            "customer since", "patient since", "member since", "client since", "account since",
            "been a customer", "been a patient", "been with you",
        ],
        also_any: NONE,
        unless: NONE,
        memory_type: MemoryType::Factual,
        importance: 3,
        confidence: 0.7,
    },
    Rule {
        category: "strong emotion",
        any: &[
            "anxious", "anxiety", "nervous", "scared", "afraid", "terrified", "frightened",
            "panic*", "frustrated", "frustrating", "angry", "furious", "livid", "upset",
            "worried", "fed up",
        ],
        also_any: FIRST_PERSON,
        unless: NONE,
        memory_type: MemoryType::Emotion,
        importance: 6,
        confidence: 0.6,
    },
    Rule {
        category: "stress",
        any: &[
            "stressed", "stressful", "stress", "frazzled", "overwhelmed", "exhausted",
            "disappointed", "disappointing", "annoyed", "sad",
        ],
        also_any: FIRST_PERSON,
        unless: NONE,
        memory_type: MemoryType::Emotion,
        importance: 5,
        confidence: 0.6,
    },
    Rule {
        category: "positive emotion",
        any: &[
            "happy", "thrilled", "delighted", "excited", "wonderful", "grateful", "relieved",
            "glad", "pleased", "over the moon",
        ],
        also_any: FIRST_PERSON,
        unless: &["happy birthday", "happy thanksgiving", "happy holidays", "happy new year"],
        memory_type: MemoryType::Emotion,
        importance: 4,
        confidence: 0.6,
    },
];

#[rustfmt::skip]
const NOT_ALLERGIC: &[&str] = &[
    "not allergic", "no allergies", "no allergy", "no known allergies", "no food allergies",
];

#[rustfmt::skip]
const ALLERGENS: &[&str] = &[
    "nut", "nuts", "peanut*", "walnut*", "almond*", "pecan*", "pistachio*", "cashew*",
    "hazelnut*", "macadamia*", "gluten", "dairy", "lactose", "shellfish", "sesame", "soy",
];

#[rustfmt::skip]
const AVOIDANCE: &[&str] = &[
    "no", "nothing", "without", "free", "avoid*", "react*", "can't have", "cannot have",
    "can't eat", "cannot eat", "never",
];

#[rustfmt::skip]
const RELATIVES: &[&str] = &[
    "my daughter*", "my son", "my sons", "my husband", "my wife", "my mother", "my father",
    "my mom", "my mum", "my dad", "my parents", "my sister", "my brother", "my partner",
    "my boyfriend", "my girlfriend", "my fiance*", "my grandmother", "my grandfather",
    "my grandma", "my grandpa", "my granddaughter", "my grandson", "my grandchild*",
    "my grandkids", "my kids", "my children", "my child", "my youngest", "my eldest",
    "my oldest", "my baby", "my toddler", "my twins", "my aunt", "my uncle", "my cousin",
    "my niece", "my nephew", "my family", "my in laws", "my stepson", "my stepdaughter",
    "my stepmom", "my stepdad", "our daughter*", "our son", "our sons", "our kids",
    "our children", "my dog", "my cat",
];

#[rustfmt::skip]
const HEALTH: &[&str] = &[
    "diabet*", "asthma*", "pregnan*", "medication*", "medicine*", "meds", "insulin", "inhaler",
    "epilep*", "seizure*", "heart condition", "blood pressure", "blood thinner*", "pacemaker",
    "dialysis", "chemo*", "cancer", "surgery", "wheelchair", "hearing aid*", "deaf", "blind",
    "dementia", "alzheimer*", "medical alert", "medical condition", "medical device",
    "oxygen",
];

#[rustfmt::skip]
const ISSUES: &[&str] = &[
    "burnt", "burned", "broken", "broke down", "drops", "dropping", "dropped", "dies",
    "not working", "isn't working", "stopped working", "doesn't work", "don't work",
    "won't work", "complaint*", "complain*", "problem*", "outage*", "faulty", "damaged",
    "missing", "wrong order", "overcharged", "charged twice", "refund*", "lost",
    "should have been", "should've been", "never arrived", "never showed", "still waiting",
];

/// Words that show the caller speaks of their own feelings.
#[rustfmt::skip]
const FIRST_PERSON: &[&str] = &[
    "i", "i'm", "i've", "i'd", "i'll", "me", "my", "we", "we're", "us", "our", "it was",
    "it's been", "feel*", "felt",
];

/// First words of short sentences that carry nothing ("Thanks.", "Okay.").
#[rustfmt::skip]
const FILLER_STARTERS: &[&str] = &[
    "hi", "hello", "hey", "thanks", "thank", "sure", "yes", "yeah", "yep", "yup", "no", "nope",
    "okay", "ok", "great", "perfect", "fine", "bye", "goodbye", "happy", "cheers", "right",
    "alright", "oh", "um", "uh", "well", "good", "nice", "lovely", "cool", "awesome",
];

/// First words that tie a sentence to the one before it.
#[rustfmt::skip]
const JOINERS: &[&str] = &[
    "he", "he's", "he'll", "he'd", "she", "she's", "she'll", "she'd", "it", "it's", "its",
    "they", "they're", "they'll", "they've", "they'd", "that", "that's", "this", "these",
    "those", "his", "her", "their", "so",
];

/// Words that point back to something said before.
#[rustfmt::skip]
const ANAPHORS: &[&str] = &[
    "it", "it's", "its", "that", "those", "these", "they", "them", "he", "she", "him", "his",
    "her",
];

/// Leading words dropped from a memory's content ("Honestly, the croissants").
#[rustfmt::skip]
const LEADING_MARKERS: &[&str] = &["and", "but", "also", "oh", "um", "uh", "so"];
#[rustfmt::skip]
const LEADING_MARKERS_WITH_COMMA: &[&str] = &[
    "honestly", "actually", "look", "well", "yes", "yeah", "sorry", "okay", "ok", "fine",
    "sure", "listen", "anyway", "thanks",
];

/// Capitalised words that are not names.
#[rustfmt::skip]
const NOT_NAMES: &[&str] = &[
    "happy", "merry", "good", "thank", "thanks", "hi", "hello", "hey", "yes", "no", "okay",
    "ok", "sure", "great", "perfect", "fine", "bye", "goodbye", "dear", "sorry", "please",
    "well", "oh", "right", "alright", "cool", "nice", "lovely", "excellent", "awesome",
    "welcome", "morning", "afternoon", "evening", "night", "today", "tomorrow", "monday",
    "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "january", "february",
    "march", "april", "may", "june", "july", "august", "september", "october", "november",
    "december", "thanksgiving", "christmas", "easter", "halloween", "mr", "mrs", "ms", "dr",
    "not", "just", "also", "and", "but", "so", "the", "a", "an", "it", "this", "that", "my",
    "your", "our", "their", "his", "her", "here", "there", "what", "when", "where", "who",
    "why", "how", "cheers", "again", "speaking", "calling", "fantastic", "wonderful",
    "certainly", "absolutely", "exactly", "sounds", "will", "can", "could", "would", "i'm",
    "i'd", "i've", "i'll",
];

/// Words before a name in the answer to "could I get your name?".
#[rustfmt::skip]
const NAME_LEAD_INS: &[&str] = &[
    "sure", "yes", "yeah", "yep", "yup", "ok", "okay", "certainly", "absolutely", "of",
    "course", "it's", "its", "it", "is", "this", "my", "name", "name's", "i'm", "i", "am",
    "hi", "hello", "hey",
];

/// Adverbs between "I" and its verb ("I usually see").
#[rustfmt::skip]
const ADVERBS: &[&str] = &[
    "usually", "never", "always", "still", "really", "just", "also", "often", "sometimes",
    "rarely", "only", "actually", "even", "already", "honestly", "truly", "definitely",
    "mostly", "normally", "generally", "totally", "absolutely",
];

/// Verb forms that stay as they are after "the caller": modals, auxiliaries
/// and irregular past tenses.
#[rustfmt::skip]
const KEEP_VERB: &[&str] = &[
    "will", "would", "can", "could", "should", "shall", "may", "might", "must", "was", "were",
    "had", "did", "bought", "broke", "said", "told", "got", "went", "made", "lost", "thought",
    "felt", "knew", "took", "saw", "came", "gave", "found", "left", "paid", "sent", "kept",
    "heard", "met", "put", "set", "ate", "drank", "fell", "forgot", "spoke", "wrote", "ran",
    "sat", "stood", "understood", "won", "began", "brought", "caught", "chose", "drove",
    "flew", "grew", "hit", "hurt", "let", "meant", "quit", "rode", "sold", "slept", "spent",
    "taught", "threw", "wore", "cut", "shut", "been", "being", "too", "and", "or", "to",
];

/// Words before "I" that make it a question ("Could I also book ...").
#[rustfmt::skip]
const AUX_BEFORE_SUBJECT: &[&str] = &[
    "do", "does", "did", "can", "could", "would", "will", "should", "shall", "may", "might",
    "must", "am", "was", "have", "had", "don't", "didn't", "can't", "won't", "shouldn't",
    "wouldn't", "couldn't",
];

/// Extracts memories about the caller from the caller's own turns, by rules.
pub fn extract_memories(turns: &[TranscriptTurn]) -> Vec<ExtractedMemory> {
    let caller_turns = caller_turns(turns);
    let mut out = Memories::default();
    let mut consumed = BTreeSet::new();

    if let Some(name) = find_caller_name(&caller_turns, &mut consumed) {
        out.push(
            format!("Caller's name is {}", name.name),
            MemoryType::Factual,
            6,
            name.confidence,
            name.quote,
        );
    }

    for (t, turn) in caller_turns.iter().enumerate() {
        if let Some(channel) = answered_channel(turn) {
            consumed.insert((t, 0));
            out.push(
                format!("The caller prefers to be contacted by {channel}."),
                MemoryType::Preference,
                7,
                0.75,
                turn.sentences[0].clone(),
            );
        }
        let kept: Vec<&str> = turn
            .sentences
            .iter()
            .enumerate()
            .filter(|(s, sentence)| !consumed.contains(&(t, *s)) && !is_filler(sentence))
            .map(|(_, sentence)| sentence.as_str())
            .collect();
        let mut unmatched_before: Option<String> = None;
        for unit in group_sentences(&kept) {
            let text = unit.join(" ");
            let Some(rule) = classify(&text).filter(|rule| says_enough(&text, rule)) else {
                unmatched_before = Some(text);
                continue;
            };
            let context = unmatched_before
                .take()
                .filter(|_| has_any_word(&tokens(unit[0]), ANAPHORS));
            let quote = match context {
                Some(context) => format!("{context} {text}"),
                None => text,
            };
            out.push(
                describe(&quote),
                rule.memory_type,
                rule.importance,
                rule.confidence,
                quote,
            );
        }
    }
    out.memories
}

/// The memories of one transcript, without repeated contents.
#[derive(Default)]
struct Memories {
    memories: Vec<ExtractedMemory>,
    seen: BTreeSet<String>,
}

impl Memories {
    fn push(
        &mut self,
        content: String,
        memory_type: MemoryType,
        importance: i64,
        confidence: f64,
        quote: String,
    ) {
        let content = truncate_chars(&content, MAX_MEMORY_CONTENT_CHARS);
        let (Ok(content), Ok(importance), Ok(confidence)) = (
            MemoryContent::new(content),
            Importance::new(importance),
            Confidence::new(confidence),
        ) else {
            return;
        };
        if !self.seen.insert(content.as_str().to_owned()) {
            return;
        }
        self.memories.push(ExtractedMemory {
            content,
            memory_type,
            importance,
            confidence,
            source_quote: Some(truncate_chars(&quote, MAX_MEMORY_CONTENT_CHARS)),
        });
    }
}

fn truncate_chars(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// A caller turn, split into sentences, with the agent's words just before it.
struct CallerTurn<'a> {
    asked: Option<&'a str>,
    sentences: Vec<String>,
}

fn caller_turns(turns: &[TranscriptTurn]) -> Vec<CallerTurn<'_>> {
    let mut last_agent = None;
    let mut out = Vec::new();
    for turn in turns {
        let message = turn.message.trim();
        match turn.speaker {
            Speaker::Agent => {
                if !message.is_empty() {
                    last_agent = Some(message);
                }
            }
            Speaker::User => {
                // A caller never says JSON: that is data, not speech.
                if message.is_empty() || message.starts_with('{') || message.starts_with('[') {
                    continue;
                }
                out.push(CallerTurn {
                    asked: last_agent.take(),
                    sentences: split_sentences(message),
                });
            }
        }
    }
    out
}

/// A one-word group ("Text.") says too little on its own; only an allergy
/// or health word ("Diabetic.") counts there.
fn says_enough(text: &str, rule: &Rule) -> bool {
    word_count(text) >= 2 || (rule.memory_type == MemoryType::Factual && rule.importance >= 7)
}

/// The first rule (in priority order) the text matches.
fn classify(text: &str) -> Option<&'static Rule> {
    let words = tokens(text);
    RULES.iter().find(|rule| {
        has_any_phrase(&words, rule.any)
            && (rule.also_any.is_empty() || has_any_phrase(&words, rule.also_any))
            && !has_any_phrase(&words, rule.unless)
    })
}

// ---------------------------------------------------------------------------
// Sentences and words
// ---------------------------------------------------------------------------

#[rustfmt::skip]
const ABBREVIATIONS: &[&str] = &[
    "dr", "mr", "mrs", "ms", "st", "jr", "sr", "prof", "mt", "ft", "vs", "etc", "e.g", "i.e",
];

/// Splits a message into sentences at `.`, `!` or `?` followed by a space
/// and a capital letter or digit, except after a title such as "Dr.".
fn split_sentences(message: &str) -> Vec<String> {
    let chars: Vec<char> = message.chars().collect();
    let mut sentences = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        if matches!(chars[i], '.' | '!' | '?') {
            let mut end = i + 1;
            while end < chars.len() && matches!(chars[end], '.' | '!' | '?' | '"' | '\'' | ')') {
                end += 1;
            }
            let next = chars[end..].iter().find(|c| !c.is_whitespace());
            let spaced = end == chars.len() || chars[end].is_whitespace();
            let starts_new =
                next.is_none_or(|c| c.is_uppercase() || c.is_ascii_digit() || *c == '"');
            let word_before: String = chars[start..i]
                .iter()
                .rev()
                .take_while(|c| !c.is_whitespace())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<String>()
                .to_lowercase();
            let abbreviation = chars[i] == '.' && ABBREVIATIONS.contains(&word_before.as_str());
            if spaced && starts_new && !abbreviation {
                push_trimmed(&mut sentences, &chars[start..end]);
                start = end;
            }
            i = end;
        } else {
            i += 1;
        }
    }
    push_trimmed(&mut sentences, &chars[start..]);
    sentences
}

fn push_trimmed(sentences: &mut Vec<String>, chars: &[char]) {
    let sentence: String = chars.iter().collect::<String>().trim().to_owned();
    if sentence.chars().any(char::is_alphanumeric) {
        sentences.push(sentence);
    }
}

/// Lowercase words, apostrophes kept inside ("don't"), curly ones made straight.
fn tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .replace(['\u{2019}', '\u{2018}'], "'")
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|word| word.trim_matches('\''))
        .filter(|word| !word.is_empty())
        .map(str::to_owned)
        .collect()
}

fn word_matches(word: &str, pattern: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => word.starts_with(prefix),
        None => word == pattern || word.strip_suffix("'s") == Some(pattern),
    }
}

fn has_phrase(words: &[String], phrase: &str) -> bool {
    let parts: Vec<&str> = phrase.split(' ').collect();
    words
        .windows(parts.len())
        .any(|window| window.iter().zip(&parts).all(|(w, p)| word_matches(w, p)))
}

fn has_any_phrase(words: &[String], phrases: &[&str]) -> bool {
    phrases.iter().any(|phrase| has_phrase(words, phrase))
}

fn has_any_word(words: &[String], list: &[&str]) -> bool {
    words.iter().any(|word| list.contains(&word.as_str()))
}

fn word_count(sentence: &str) -> usize {
    sentence.split_whitespace().count()
}

fn is_short(sentence: &str) -> bool {
    word_count(sentence) <= 3
}

fn first_word(sentence: &str) -> Option<String> {
    tokens(sentence).into_iter().next()
}

fn is_filler(sentence: &str) -> bool {
    is_short(sentence)
        && first_word(sentence).is_some_and(|w| FILLER_STARTERS.contains(&w.as_str()))
}

/// Groups a turn's sentences: a sentence joins the group before it when it
/// starts with a pronoun or "So", when it is short and not the first, or
/// when the group before ends with a question.
fn group_sentences<'s>(sentences: &[&'s str]) -> Vec<Vec<&'s str>> {
    let mut groups: Vec<Vec<&'s str>> = Vec::new();
    for &sentence in sentences {
        let joins = match groups.last() {
            None => false,
            Some(group) => {
                is_short(sentence)
                    || first_word(sentence).is_some_and(|w| JOINERS.contains(&w.as_str()))
                    || group.last().is_some_and(|s| s.ends_with('?'))
            }
        };
        if let Some(group) = groups.last_mut().filter(|_| joins) {
            group.push(sentence);
        } else {
            groups.push(vec![sentence]);
        }
    }
    groups
}

// ---------------------------------------------------------------------------
// Content: the caller's words in the third person
// ---------------------------------------------------------------------------

/// A standalone sentence about the caller made from their own words.
fn describe(quote: &str) -> String {
    let stripped = strip_leading_markers(quote);
    let (rewritten, mentions_caller) = rewrite_first_person(stripped);
    if mentions_caller {
        capitalize_first(&rewritten)
    } else {
        format!("The caller says: {}", capitalize_first(&rewritten))
    }
}

fn strip_leading_markers(text: &str) -> &str {
    let mut rest = text.trim_start();
    loop {
        let word_len = rest
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(rest.len());
        let word = rest[..word_len].to_lowercase();
        let after = &rest[word_len..];
        let comma = after.starts_with(',');
        let space = after.starts_with(' ');
        let strip = (LEADING_MARKERS.contains(&word.as_str()) && (comma || space))
            || (LEADING_MARKERS_WITH_COMMA.contains(&word.as_str()) && comma);
        let remaining = after.trim_start_matches(',').trim_start();
        if !strip || remaining.is_empty() {
            return rest;
        }
        rest = remaining;
    }
}

fn capitalize_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The third-person form of a first-person word: (first mention, later
/// mentions). The first mention names "the caller", later ones use "they".
fn third_person(word: &str) -> Option<(&'static str, &'static str)> {
    Some(match word {
        "i" => ("the caller", "they"),
        "i'm" => ("the caller is", "they're"),
        "i've" => ("the caller has", "they've"),
        "i'd" => ("the caller would", "they'd"),
        "i'll" => ("the caller will", "they'll"),
        "my" => ("the caller's", "their"),
        "me" => ("the caller", "them"),
        "mine" => ("the caller's", "theirs"),
        "myself" => ("the caller", "themselves"),
        "we" => ("the caller and their family", "they"),
        "we're" => ("the caller and their family are", "they're"),
        "we've" => ("the caller and their family have", "they've"),
        "we'll" => ("the caller and their family will", "they'll"),
        "we'd" => ("the caller and their family would", "they'd"),
        "us" => ("the caller's family", "them"),
        "our" => ("the caller's", "their"),
        "ours" => ("the caller's", "theirs"),
        "ourselves" => ("the caller's family", "themselves"),
        _ => return None,
    })
}

/// A piece of text: a word (letters, digits, apostrophes) or what lies
/// between words.
struct Piece {
    text: String,
    is_word: bool,
}

fn pieces(text: &str) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for c in text.chars() {
        let is_word = c.is_alphanumeric() || matches!(c, '\'' | '\u{2019}');
        match out.last_mut() {
            Some(piece) if piece.is_word == is_word => piece.text.push(c),
            _ => out.push(Piece {
                text: c.to_string(),
                is_word,
            }),
        }
    }
    out
}

fn normalized(word: &str) -> String {
    word.to_lowercase().replace('\u{2019}', "'")
}

/// Rewrites "I", "my", "we", ... into the third person and makes the verb
/// after "I" agree. Returns the text and whether it now names the caller.
fn rewrite_first_person(text: &str) -> (String, bool) {
    let pieces = pieces(text);
    let mut out: Vec<String> = pieces.iter().map(|p| p.text.clone()).collect();
    let mut mentioned = false;
    for i in 0..pieces.len() {
        if !pieces[i].is_word {
            continue;
        }
        let word = normalized(&pieces[i].text);
        let Some((first, later)) = third_person(&word) else {
            continue;
        };
        let replacement = if mentioned { later } else { first };
        out[i] = if starts_sentence(&pieces, i) {
            capitalize_first(replacement)
        } else {
            replacement.to_owned()
        };
        if word == "i" {
            agree_verb(&pieces, &mut out, i, !mentioned);
        }
        mentioned = true;
    }
    (out.concat(), mentioned)
}

/// Whether the word at `i` begins a sentence. Pieces alternate between
/// words and separators, so `pieces[i - 1]` is the separator before it.
fn starts_sentence(pieces: &[Piece], i: usize) -> bool {
    i <= 1 || pieces[i - 1].text.contains(['.', '!', '?'])
}

/// Makes the verb after the subject "I" (now "the caller" or "they") agree.
fn agree_verb(pieces: &[Piece], out: &mut [String], subject: usize, singular: bool) {
    let previous_word = subject
        .checked_sub(2)
        .filter(|&p| pieces[p].is_word && pieces[p + 1].text.trim().is_empty())
        .map(|p| normalized(&pieces[p].text));
    if previous_word.is_some_and(|w| AUX_BEFORE_SUBJECT.contains(&w.as_str())) {
        return;
    }
    let mut j = subject;
    loop {
        let (Some(separator), Some(next)) = (pieces.get(j + 1), pieces.get(j + 2)) else {
            return;
        };
        if !separator.text.trim().is_empty() || !next.is_word {
            return;
        }
        j += 2;
        let word = normalized(&next.text);
        if ADVERBS.contains(&word.as_str()) {
            continue;
        }
        if next.text != word {
            return; // capitalised or curly: not a plain verb
        }
        let agreed = if singular {
            singular_verb(&word)
        } else {
            plural_verb(&word)
        };
        if let Some(agreed) = agreed {
            out[j] = agreed;
        }
        return;
    }
}

fn singular_verb(verb: &str) -> Option<String> {
    let irregular = match verb {
        "am" => Some("is"),
        "have" => Some("has"),
        "do" => Some("does"),
        "go" => Some("goes"),
        "don't" => Some("doesn't"),
        "haven't" => Some("hasn't"),
        _ => None,
    };
    if let Some(form) = irregular {
        return Some(form.to_owned());
    }
    if KEEP_VERB.contains(&verb)
        || verb.ends_with("ed")
        || verb.len() < 2
        || !verb.chars().all(|c| c.is_ascii_lowercase())
    {
        return None;
    }
    let consonant_y = verb.ends_with('y')
        && verb
            .chars()
            .rev()
            .nth(1)
            .is_some_and(|c| !"aeiou".contains(c));
    Some(if consonant_y {
        format!("{}ies", &verb[..verb.len() - 1])
    } else if ["s", "sh", "ch", "x", "z", "o"]
        .iter()
        .any(|end| verb.ends_with(end))
    {
        format!("{verb}es")
    } else {
        format!("{verb}s")
    })
}

fn plural_verb(verb: &str) -> Option<String> {
    match verb {
        "am" => Some("are".to_owned()),
        "was" => Some("were".to_owned()),
        "wasn't" => Some("weren't".to_owned()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The caller's name
// ---------------------------------------------------------------------------

struct NameFound {
    name: String,
    confidence: f64,
    quote: String,
}

struct NameCandidate {
    words: Vec<String>,
    confidence: f64,
    quote: String,
}

/// A sentence split into words with the punctuation around them removed;
/// `true` when the word ended a clause (",", ".", "?", ...).
fn name_words(sentence: &str) -> Vec<(String, bool)> {
    sentence
        .split_whitespace()
        .map(|raw| {
            let core = raw.trim_matches(|c: char| !c.is_alphanumeric());
            let ends_clause = raw
                .trim_end_matches(['"', '\'', ')'])
                .ends_with([',', '.', ';', ':', '!', '?']);
            (core.to_owned(), ends_clause)
        })
        .collect()
}

fn is_name_word(word: &str) -> bool {
    let mut chars = word.chars();
    chars.next().is_some_and(char::is_uppercase)
        && word.chars().count() >= 2
        && word.chars().any(char::is_lowercase)
        && word
            .chars()
            .all(|c| c.is_alphabetic() || matches!(c, '\'' | '\u{2019}' | '-'))
        && !word.ends_with("'s")
        && !word.ends_with("\u{2019}s")
        && !NOT_NAMES.contains(&normalized(word).as_str())
}

/// Up to three name words from `start`, stopping after a word that ends a
/// clause. Returns the name and the index after it.
fn capture_name(words: &[(String, bool)], start: usize) -> Option<(Vec<String>, usize)> {
    let mut name = Vec::new();
    let mut end = start;
    for (word, ends_clause) in words.iter().skip(start).take(3) {
        if !is_name_word(word) {
            break;
        }
        name.push(word.clone());
        end += 1;
        if *ends_clause {
            break;
        }
    }
    (!name.is_empty()).then_some((name, end))
}

fn find_phrase(words: &[(String, bool)], phrase: &[&str]) -> Option<usize> {
    words
        .windows(phrase.len())
        .position(|window| {
            window
                .iter()
                .zip(phrase)
                .all(|((w, _), p)| normalized(w) == *p)
        })
        .map(|at| at + phrase.len())
}

fn asks_for_name(agent: &str) -> bool {
    let agent = agent.to_lowercase();
    agent.contains('?')
        && (agent.contains("name")
            || agent.contains("who am i speaking")
            || agent.contains("who's calling")
            || agent.contains("who is calling"))
}

/// Finds the caller's name; marks sentences that are nothing but a name as
/// used so they give no other memory.
fn find_caller_name(
    turns: &[CallerTurn<'_>],
    consumed: &mut BTreeSet<(usize, usize)>,
) -> Option<NameFound> {
    const EXPLICIT: &[&[&str]] = &[
        &["my", "name", "is"],
        &["my", "name's"],
        &["name's"],
        &["call", "me"],
    ];
    const INTRODUCTION: &[&[&str]] = &[
        &["this", "is"],
        &["it's"],
        &["it", "is"],
        &["i'm"],
        &["i", "am"],
    ];
    let mut candidates: Vec<NameCandidate> = Vec::new();

    for (t, turn) in turns.iter().enumerate() {
        let answering = turn.asked.is_some_and(asks_for_name);
        let mut answered = false;
        for (s, sentence) in turn.sentences.iter().enumerate() {
            let words = name_words(sentence);
            let mut found = |name: Vec<String>, confidence: f64| {
                candidates.push(NameCandidate {
                    words: name,
                    confidence,
                    quote: sentence.clone(),
                })
            };
            for (patterns, confidence, allowed) in
                [(EXPLICIT, 0.8, true), (INTRODUCTION, 0.7, t == 0)]
            {
                if !allowed {
                    continue;
                }
                for pattern in patterns {
                    if let Some((name, _)) =
                        find_phrase(&words, pattern).and_then(|at| capture_name(&words, at))
                    {
                        found(name, confidence);
                    }
                }
            }
            if answering && !answered {
                let start = words
                    .iter()
                    .position(|(w, _)| !NAME_LEAD_INS.contains(&normalized(w).as_str()));
                if let Some(start) = start {
                    answered = true;
                    if let Some((name, end)) = capture_name(&words, start) {
                        if end == words.len() {
                            consumed.insert((t, s));
                        }
                        found(name, 0.75);
                        continue;
                    }
                }
            }
            let bare = (2..=3).contains(&words.len())
                && words.iter().all(|(w, _)| is_name_word(w))
                && words[..words.len() - 1].iter().all(|(_, ends)| !ends);
            if bare {
                consumed.insert((t, s));
                found(words.into_iter().map(|(w, _)| w).collect(), 0.6);
            }
        }
    }

    // The longest name wins, the first found on a tie.
    let best = candidates
        .iter()
        .fold(None::<&NameCandidate>, |best, c| match best {
            Some(b) if b.words.len() >= c.words.len() => Some(b),
            _ => Some(c),
        })?;
    // A shorter mention of the same name ("it's Maya again") backs it up.
    let confidence = candidates
        .iter()
        .filter(|c| best.words.starts_with(&c.words))
        .map(|c| c.confidence)
        .fold(best.confidence, f64::max);
    Some(NameFound {
        name: best.words.join(" "),
        confidence,
        quote: best.quote.clone(),
    })
}

// ---------------------------------------------------------------------------
// "By email or by text?" answered in a word
// ---------------------------------------------------------------------------

#[rustfmt::skip]
const CHANNELS: &[(&str, &[&str])] = &[
    ("email", &["email", "emails", "mail"]),
    ("text message", &["text", "texts", "texting", "sms", "message", "messages"]),
    ("phone", &["call", "calls", "phone", "ring"]),
];

fn channels_in(text: &str) -> Vec<&'static str> {
    let words = tokens(text);
    CHANNELS
        .iter()
        .filter(|(_, names)| has_any_word(&words, names))
        .map(|(channel, _)| *channel)
        .collect()
}

/// The channel a caller picks in a short answer to the agent's choice.
fn answered_channel(turn: &CallerTurn<'_>) -> Option<&'static str> {
    let asked = turn.asked?;
    let answer = turn.sentences.first()?;
    if !asked.contains('?') || channels_in(asked).len() < 2 || word_count(answer) > 4 {
        return None;
    }
    match channels_in(answer).as_slice() {
        [channel] => Some(channel),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(message: &str) -> TranscriptTurn {
        TranscriptTurn {
            speaker: Speaker::User,
            message: message.to_owned(),
            time_in_call_secs: None,
        }
    }

    fn agent(message: &str) -> TranscriptTurn {
        TranscriptTurn {
            speaker: Speaker::Agent,
            message: message.to_owned(),
            time_in_call_secs: None,
        }
    }

    fn contents(memories: &[ExtractedMemory]) -> Vec<&str> {
        memories.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn every_rule_holds_valid_values() {
        for rule in RULES {
            assert!(
                Importance::new(rule.importance).is_ok(),
                "{}",
                rule.category
            );
            assert!(
                Confidence::new(rule.confidence).is_ok(),
                "{}",
                rule.category
            );
            assert!((0.6..=0.8).contains(&rule.confidence), "{}", rule.category);
            for phrase in rule.any.iter().chain(rule.also_any).chain(rule.unless) {
                assert_eq!(phrase.trim(), *phrase);
                assert!(!phrase.contains("  ") && !phrase.contains('-'), "{phrase}");
                assert_eq!(phrase.to_lowercase(), *phrase);
            }
        }
    }

    #[test]
    fn agent_turns_and_empty_messages_give_nothing() {
        let turns = [
            agent("My name is Poppy. I'm allergic to nothing, I love cake, my daughter is happy."),
            user(""),
            user("   "),
            user("{\"drops_last_7_days\": 9, \"node\": \"CHI-N-114\", \"problem\": true}"),
        ];
        assert!(extract_memories(&turns).is_empty());
        assert!(extract_memories(&[]).is_empty());
    }

    #[test]
    fn names_from_patterns_answers_and_bare_sentences() {
        let explicit = extract_memories(&[user(
            "Hello, my name is Ana Lucia Ferreira, calling about my order.",
        )]);
        assert_eq!(
            contents(&explicit)[0],
            "Caller's name is Ana Lucia Ferreira"
        );
        assert_eq!(explicit[0].memory_type, MemoryType::Factual);
        assert_eq!(explicit[0].importance.get(), 6);

        let answer = extract_memories(&[
            agent("Could I get your name for the order?"),
            user("Sure. Maya Okafor. That's O, K, A, F, O, R."),
        ]);
        assert_eq!(contents(&answer), ["Caller's name is Maya Okafor"]);
        assert_eq!(answer[0].source_quote.as_deref(), Some("Maya Okafor."));

        let single = extract_memories(&[agent("And your name?"), user("It's Tom.")]);
        assert_eq!(contents(&single), ["Caller's name is Tom"]);

        let intro_then_full = extract_memories(&[user("Hi, it's Maya again. Maya Okafor.")]);
        assert_eq!(contents(&intro_then_full), ["Caller's name is Maya Okafor"]);

        // Greetings and the agent's name are not the caller's name.
        let none = extract_memories(&[user("Happy Thanksgiving, Poppy."), user("Good Morning.")]);
        assert!(none.is_empty(), "{:?}", contents(&none));
        // "I'm X" only introduces in the first turn.
        let later = extract_memories(&[user("Hello there."), user("I'm Jewish.")]);
        assert!(later.is_empty(), "{:?}", contents(&later));
    }

    #[test]
    fn allergy_wins_over_relationship_and_sentences_group() {
        let memories = extract_memories(&[user(
            "My son is allergic to peanuts. He carries an EpiPen. Also my son loves trains.",
        )]);
        assert_eq!(
            contents(&memories),
            [
                "The caller's son is allergic to peanuts. He carries an EpiPen.",
                "The caller's son loves trains."
            ]
        );
        assert_eq!(memories[0].memory_type, MemoryType::Factual);
        assert_eq!(memories[0].importance.get(), 10);
        assert_eq!(
            memories[0].source_quote.as_deref(),
            Some("My son is allergic to peanuts. He carries an EpiPen.")
        );
        assert_eq!(memories[1].memory_type, MemoryType::Relationship);
    }

    #[test]
    fn each_category_is_recognised() {
        let cases: &[(&str, MemoryType, u8)] = &[
            (
                "I'm not able to eat anything with nuts, so no walnuts please.",
                MemoryType::Factual,
                9,
            ),
            (
                "My wife is pregnant, her medical condition is delicate.",
                MemoryType::Relationship,
                9,
            ),
            ("I'm diabetic.", MemoryType::Factual, 7),
            (
                "If this isn't fixed I'm cancelling my account.",
                MemoryType::Issue,
                8,
            ),
            ("I have a terrible toothache.", MemoryType::Issue, 8),
            ("My internet keeps dropping.", MemoryType::Issue, 7),
            ("The delivery arrived damaged.", MemoryType::Issue, 6),
            (
                "Please text me instead of calling.",
                MemoryType::Preference,
                7,
            ),
            (
                "I prefer the morning appointments.",
                MemoryType::Preference,
                6,
            ),
            ("I teach middle school.", MemoryType::Factual, 5),
            (
                "I've been a customer for ten years.",
                MemoryType::Factual,
                3,
            ),
            (
                "I'm really nervous about the procedure.",
                MemoryType::Emotion,
                6,
            ),
            ("I'm so stressed this week.", MemoryType::Emotion, 5),
            ("We were thrilled with the cake.", MemoryType::Emotion, 4),
        ];
        for (sentence, memory_type, importance) in cases {
            let memories = extract_memories(&[user(sentence)]);
            assert_eq!(memories.len(), 1, "{sentence}: {:?}", contents(&memories));
            assert_eq!(memories[0].memory_type, *memory_type, "{sentence}");
            assert_eq!(memories[0].importance.get(), *importance, "{sentence}");
            assert_eq!(memories[0].source_quote.as_deref(), Some(*sentence));
        }
    }

    #[test]
    fn neutral_sentences_and_greetings_give_nothing() {
        let memories = extract_memories(&[
            user("Hi Poppy."),
            user("Happy seventh birthday Zuri, in purple."),
            user("Saturday the fifteenth, around ten in the morning."),
            user("No problem, that's fine. Happy birthday to her!"),
            user("Okay. Thanks, I guess."),
        ]);
        assert!(memories.is_empty(), "{:?}", contents(&memories));
    }

    #[test]
    fn first_person_becomes_third_person() {
        let cases = [
            ("I work from home.", "The caller works from home."),
            (
                "Honestly, I usually see Dr. Alvarez and I'd like to keep it that way.",
                "The caller usually sees Dr. Alvarez and they'd like to keep it that way.",
            ),
            (
                "I'm allergic to latex, I broke out in hives once.",
                "The caller is allergic to latex, they broke out in hives once.",
            ),
            (
                "Could I also book my son?",
                "Could the caller also book their son?",
            ),
            (
                "We're all crazy about lemon.",
                "The caller and their family are all crazy about lemon.",
            ),
            (
                "Sorry, I'm a little frazzled.",
                "The caller is a little frazzled.",
            ),
            (
                "I never watch the news, I guess.",
                "The caller never watches the news, they guess.",
            ),
            (
                "Zuri has a severe tree nut allergy.",
                "The caller says: Zuri has a severe tree nut allergy.",
            ),
            (
                "And, um, the croissants were burnt.",
                "The caller says: The croissants were burnt.",
            ),
        ];
        for (quote, content) in cases {
            assert_eq!(describe(quote), content);
        }
    }

    #[test]
    fn a_sentence_pointing_back_keeps_its_context() {
        let memories = extract_memories(&[user(
            "You did lemon and raspberry for the cake. We're all still crazy about that combination.",
        )]);
        assert_eq!(
            contents(&memories),
            ["You did lemon and raspberry for the cake. The caller and their family are all still crazy about that combination."]
        );
        assert_eq!(
            memories[0].source_quote.as_deref(),
            Some("You did lemon and raspberry for the cake. We're all still crazy about that combination.")
        );
    }

    #[test]
    fn a_one_word_answer_to_a_channel_question_is_a_contact_preference() {
        let memories = extract_memories(&[
            agent("Would you like updates by email or by text?"),
            user("Text. I don't check email during sessions."),
        ]);
        assert_eq!(
            contents(&memories),
            [
                "The caller prefers to be contacted by text message.",
                "The caller doesn't check email during sessions."
            ]
        );
        assert!(memories.iter().all(|m| m.importance.get() == 7));
        // Without the question, "Text." is nothing.
        assert!(extract_memories(&[user("Text.")]).is_empty());
    }

    #[test]
    fn sentences_split_on_terminators_but_not_titles_or_lowercase() {
        assert_eq!(
            split_sentences(
                "Yes. I see Dr. Alvarez at eight a.m. right after my shift! Is that ok? 42 is fine"
            ),
            [
                "Yes.",
                "I see Dr. Alvarez at eight a.m. right after my shift!",
                "Is that ok?",
                "42 is fine"
            ]
        );
        assert!(split_sentences(" ... ").is_empty());
    }

    #[test]
    fn identical_contents_are_kept_once_and_output_is_deterministic() {
        let turns = [
            user("My internet keeps dropping."),
            user("My internet keeps dropping."),
        ];
        assert_eq!(extract_memories(&turns).len(), 1);
        assert_eq!(extract_memories(&turns), extract_memories(&turns));
    }

    #[test]
    fn negated_allergies_and_curly_apostrophes() {
        assert!(extract_memories(&[user("I'm not allergic to anything.")]).is_empty());
        let curly = extract_memories(&[user("I\u{2019}m allergic to peanuts.")]);
        assert_eq!(contents(&curly), ["The caller is allergic to peanuts."]);
    }

    #[test]
    fn odd_input_does_not_panic() {
        for message in [
            ".",
            "?!",
            "I",
            "My",
            "\u{2019}",
            "\"I\"",
            "Ça va? Très bien. Ich bin müde.",
            "a.b.c. D",
            "Dr.",
            "I I I I",
            "😀 I'm thrilled 😀",
            "my my my daughter",
            "\u{0}\u{7}",
        ] {
            let memories = extract_memories(&[user(message)]);
            for m in &memories {
                assert!(!m.content.as_str().is_empty());
            }
        }
    }

    #[test]
    fn content_is_capped_at_the_limit() {
        let long = format!("I'm allergic to {}.", "peanuts and ".repeat(2_000));
        let memories = extract_memories(&[user(&long)]);
        assert_eq!(memories.len(), 1);
        assert_eq!(
            memories[0].content.as_str().chars().count(),
            MAX_MEMORY_CONTENT_CHARS
        );
        assert!(
            memories[0].source_quote.as_ref().unwrap().chars().count() <= MAX_MEMORY_CONTENT_CHARS
        );
    }
}
