//! The rules extractor on the ElevenLabs fixture transcripts
//! (tests/fixtures/elevenlabs/, described in its README under "Facts a good
//! extractor should find").

use elaaoms_extractor::rules::extract_memories;
use elaaoms_shared::domain::{ExtractedMemory, MemoryType, Speaker, TranscriptTurn};
use serde_json::Value;

const MAYA_1: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/elevenlabs/post_call_transcription_bakery_maya_2025-11-03.json"
));
const MAYA_2: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/elevenlabs/post_call_transcription_bakery_maya_2025-11-20.json"
));
const PRIYA: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/elevenlabs/post_call_transcription_dental_priya_2025-11-12.json"
));
const TOM: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/elevenlabs/post_call_transcription_telecom_tom_2025-11-18.json"
));

/// `data.transcript[]` as turns; a turn without a message (a tool call) is
/// dropped, as the ingest normaliser does.
fn transcript(fixture: &str) -> Vec<TranscriptTurn> {
    let body: Value = serde_json::from_str(fixture).expect("fixture is JSON");
    body["data"]["transcript"]
        .as_array()
        .expect("data.transcript is an array")
        .iter()
        .filter_map(|turn| {
            let speaker = match turn["role"].as_str()? {
                "agent" => Speaker::Agent,
                "user" => Speaker::User,
                other => panic!("unexpected role {other}"),
            };
            let message = turn["message"].as_str()?.trim();
            (!message.is_empty()).then(|| TranscriptTurn {
                speaker,
                message: message.to_owned(),
                time_in_call_secs: turn["time_in_call_secs"].as_f64(),
            })
        })
        .collect()
}

/// Extracts, prints the list for a reviewer, and checks what holds for
/// every fixture.
fn extract(name: &str, fixture: &str) -> Vec<ExtractedMemory> {
    let turns = transcript(fixture);
    let memories = extract_memories(&turns);
    eprintln!("--- {name}: {} memories", memories.len());
    for m in &memories {
        eprintln!(
            "[{} {} {:.2}] {}\n      quote: {:?}",
            m.memory_type,
            m.importance.get(),
            m.confidence.get(),
            m.content.as_str(),
            m.source_quote.as_deref().unwrap_or("")
        );
    }

    assert!(!memories.is_empty(), "{name}: no memories");
    assert_eq!(
        memories,
        extract_memories(&turns),
        "{name}: not deterministic"
    );
    let caller_words: Vec<&str> = turns
        .iter()
        .filter(|t| t.speaker == Speaker::User)
        .map(|t| t.message.as_str())
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for m in &memories {
        let content = m.content.as_str();
        assert!((1..=10).contains(&m.importance.get()));
        assert!((0.6..=0.8).contains(&m.confidence.get()), "{content}");
        assert!(seen.insert(content), "{name}: duplicate {content}");
        let lower = content.to_lowercase();
        for agent_only in [
            "virtual assistant",
            "automated assistant",
            "crumb and hearth",
            "bright harbor",
            "lakeshore fiber",
        ] {
            assert!(
                !lower.contains(agent_only),
                "{name}: agent words in {content}"
            );
        }
        // Every quote is the caller's own words.
        let quote = m.source_quote.as_deref().expect("a quote");
        for sentence in quote.split(". ") {
            let sentence = sentence.trim_end_matches('.');
            assert!(
                caller_words.iter().any(|w| w.contains(sentence)),
                "{name}: quote not from the caller: {sentence}"
            );
        }
    }
    memories
}

fn find<'m>(
    memories: &'m [ExtractedMemory],
    memory_type: MemoryType,
    words: &[&str],
) -> Option<&'m ExtractedMemory> {
    memories.iter().find(|m| {
        let content = m.content.as_str().to_lowercase();
        m.memory_type == memory_type && words.iter().any(|w| content.contains(&w.to_lowercase()))
    })
}

fn has<'m>(
    memories: &'m [ExtractedMemory],
    memory_type: MemoryType,
    words: &[&str],
) -> &'m ExtractedMemory {
    find(memories, memory_type, words)
        .unwrap_or_else(|| panic!("no {memory_type} memory mentioning any of {words:?}"))
}

#[test]
fn maya_first_call() {
    let memories = extract("bakery maya 2025-11-03", MAYA_1);
    let allergy = has(&memories, MemoryType::Factual, &["tree nut allergy"]);
    assert!(allergy.importance.get() >= 9);
    let name = has(&memories, MemoryType::Factual, &["Maya Okafor"]);
    assert_eq!(name.content.as_str(), "Caller's name is Maya Okafor");
    assert_eq!(name.importance.get(), 6);
    has(&memories, MemoryType::Preference, &["lemon", "raspberry"]);
    has(&memories, MemoryType::Issue, &["burnt"]);
    assert!(has(&memories, MemoryType::Issue, &["burnt"])
        .content
        .as_str()
        .contains("croissants"));
    has(&memories, MemoryType::Relationship, &["Daniel", "daughter"]);
    has(&memories, MemoryType::Emotion, &["frazzled", "stressed"]);
}

#[test]
fn maya_second_call() {
    let memories = extract("bakery maya 2025-11-20", MAYA_2);
    has(&memories, MemoryType::Factual, &["Maya Okafor"]);
    let nuts = has(&memories, MemoryType::Factual, &["walnuts", "nuts"]);
    assert!(nuts.importance.get() >= 9);
    has(&memories, MemoryType::Factual, &["diabetic"]);
    has(
        &memories,
        MemoryType::Relationship,
        &["mother-in-law Grace"],
    );
    has(&memories, MemoryType::Preference, &["text", "call"]);
    has(&memories, MemoryType::Preference, &["lemon", "raspberry"]);
    has(&memories, MemoryType::Factual, &["teaches middle school"]);
    let resolved = has(&memories, MemoryType::Issue, &["burnt"]);
    assert!(
        resolved.importance.get() <= 4,
        "a resolved complaint is minor"
    );
}

#[test]
fn priya() {
    let memories = extract("dental priya 2025-11-12", PRIYA);
    let penicillin = has(&memories, MemoryType::Factual, &["penicillin"]);
    assert!(penicillin.importance.get() >= 9);
    let latex = has(&memories, MemoryType::Factual, &["latex"]);
    assert!(latex.importance.get() >= 9);
    has(&memories, MemoryType::Emotion, &["nervous", "anxious"]);
    has(&memories, MemoryType::Issue, &["pain"]);
    has(&memories, MemoryType::Relationship, &["son"]);
    has(&memories, MemoryType::Preference, &["email"]);
    has(&memories, MemoryType::Factual, &["Priya Raman"]);
}

#[test]
fn tom() {
    let memories = extract("telecom tom 2025-11-18", TOM);
    has(&memories, MemoryType::Issue, &["internet keeps dropping"]);
    let father = has(
        &memories,
        MemoryType::Relationship,
        &["dad", "father", "Walter"],
    );
    assert!(
        father.importance.get() >= 8,
        "the medical alert pendant depends on the line"
    );
    let threat = has(&memories, MemoryType::Issue, &["cancelling", "switching"]);
    assert_eq!(threat.importance.get(), 8);
    has(&memories, MemoryType::Preference, &["text"]);
    has(&memories, MemoryType::Factual, &["Tom Whitaker"]);
    for m in &memories {
        let content = m.content.as_str();
        assert!(!content.contains("CHI-N-114"), "tool data in {content}");
        assert!(
            !content.contains("drops_last_7_days"),
            "tool data in {content}"
        );
        assert!(
            !content.contains("check_line_status"),
            "tool data in {content}"
        );
    }
}
