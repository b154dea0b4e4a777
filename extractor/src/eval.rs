//! Evaluation of an extractor on a labelled set (`elaaoms eval`): each case
//! is a transcript and the memories a good extractor should find. An
//! extracted memory matches an expected one of the same type when their
//! embeddings are similar enough; each is matched at most once (best pairs
//! first), so precision = matched / extracted and recall = matched /
//! expected, per memory type and overall.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use elaaoms_shared::domain::{ExtractedMemory, MemoryType, TranscriptTurn};
use elaaoms_shared::embedder::{Embedder, EmbedderError};
use serde::Deserialize;

use crate::llm;
use crate::prompt::PromptInput;
use crate::provider::{Provider, RetryPolicy};
use crate::rules;

/// The similarity bar of a match (cosine on the embedder's vectors).
pub const DEFAULT_MATCH_THRESHOLD: f32 = 0.6;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("reading the labelled set {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("labelled case {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the labelled set {0} has no cases")]
    Empty(PathBuf),
    #[error("embedding for the evaluation: {0}")]
    Embed(#[from] EmbedderError),
    #[error("case {case}: the extractor failed: {reason}")]
    Extract { case: String, reason: String },
}

/// A memory a good extractor should find.
#[derive(Debug, Clone, Deserialize)]
pub struct ExpectedMemory {
    pub content: String,
    #[serde(rename = "type")]
    pub memory_type: MemoryType,
    pub importance: u8,
}

/// One labelled transcript.
#[derive(Debug, Clone, Deserialize)]
pub struct EvalCase {
    pub id: String,
    pub domain: String,
    pub turns: Vec<TranscriptTurn>,
    pub expected: Vec<ExpectedMemory>,
}

/// Every `*.json` file of `dir`, sorted by name (stable output).
pub fn load_cases(dir: &Path) -> Result<Vec<EvalCase>, EvalError> {
    let read_error = |source| EvalError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_error)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    let cases = paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| EvalError::Read {
                path: path.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|source| EvalError::Parse { path, source })
        })
        .collect::<Result<Vec<EvalCase>, _>>()?;
    if cases.is_empty() {
        return Err(EvalError::Empty(dir.to_owned()));
    }
    Ok(cases)
}

/// What is evaluated: the offline rules or an LLM provider, as the worker
/// runs them.
pub enum EvalExtractor {
    Rules,
    Llm {
        provider: Box<dyn Provider>,
        retry_policy: RetryPolicy,
    },
}

impl EvalExtractor {
    pub fn label(&self) -> String {
        match self {
            Self::Rules => "rules".to_owned(),
            Self::Llm { provider, .. } => format!("{}:{}", provider.name(), provider.model()),
        }
    }

    pub async fn extract(&self, turns: &[TranscriptTurn]) -> Result<Vec<ExtractedMemory>, String> {
        match self {
            Self::Rules => Ok(rules::extract_memories(turns)),
            Self::Llm {
                provider,
                retry_policy,
            } => {
                let input = PromptInput {
                    agent: None,
                    open_issues: &[],
                    turns,
                };
                let run = llm::extract(provider.as_ref(), retry_policy, &input).await;
                run.result
                    .map(|output| output.memories)
                    .map_err(|err| elaaoms_shared::bus::consumer::error_chain(&err))
            }
        }
    }
}

/// Counts for one memory type (or all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub extracted: usize,
    pub expected: usize,
    pub matched: usize,
}

impl Counts {
    /// `None` when nothing was extracted (precision is undefined then).
    pub fn precision(&self) -> Option<f64> {
        (self.extracted > 0).then(|| self.matched as f64 / self.extracted as f64)
    }

    pub fn recall(&self) -> Option<f64> {
        (self.expected > 0).then(|| self.matched as f64 / self.expected as f64)
    }

    fn add(&mut self, other: Counts) {
        self.extracted += other.extracted;
        self.expected += other.expected;
        self.matched += other.matched;
    }
}

/// The evaluation's result.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub cases: usize,
    pub per_type: BTreeMap<&'static str, Counts>,
    pub overall: Counts,
    /// Cases the extractor failed on (an LLM error), with the reason.
    pub failures: Vec<(String, String)>,
    /// Sum over matched pairs of |extracted importance - labelled importance|.
    pub importance_error_sum: u64,
}

impl Report {
    /// How far the importance of a matched memory is from its label, on average.
    pub fn mean_importance_error(&self) -> Option<f64> {
        (self.overall.matched > 0)
            .then(|| self.importance_error_sum as f64 / self.overall.matched as f64)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = |value: Option<f64>| {
            value.map_or_else(
                || "    -".to_owned(),
                |value| format!("{:5.1}", value * 100.0),
            )
        };
        writeln!(
            f,
            "{:<13} {:>9} {:>8} {:>7} {:>10} {:>7}",
            "type", "extracted", "expected", "matched", "precision%", "recall%"
        )?;
        let rows = self
            .per_type
            .iter()
            .map(|(name, counts)| (*name, counts))
            .chain(std::iter::once(("overall", &self.overall)));
        for (name, counts) in rows {
            writeln!(
                f,
                "{:<13} {:>9} {:>8} {:>7} {:>10} {:>7}",
                name,
                counts.extracted,
                counts.expected,
                counts.matched,
                percent(counts.precision()),
                percent(counts.recall())
            )?;
        }
        if let Some(error) = self.mean_importance_error() {
            writeln!(f, "mean importance error of matched memories: {error:.2}")?;
        }
        write!(f, "{} case(s), {} failed", self.cases, self.failures.len())
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 {
        0.0
    } else {
        dot / denominator
    }
}

/// One-to-one matching, best pairs first: pairs of the same type at or
/// above `threshold`. Returns the matched (extracted, expected) indices.
pub fn match_memories(
    extracted: &[(MemoryType, Vec<f32>)],
    expected: &[(MemoryType, Vec<f32>)],
    threshold: f32,
) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (i, (kind, vector)) in extracted.iter().enumerate() {
        for (j, (wanted, target)) in expected.iter().enumerate() {
            let similarity = cosine(vector, target);
            if kind == wanted && similarity >= threshold {
                pairs.push((similarity, i, j));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut used_extracted, mut used_expected) =
        (vec![false; extracted.len()], vec![false; expected.len()]);
    let mut matches = Vec::new();
    for (_, i, j) in pairs {
        if !used_extracted[i] && !used_expected[j] {
            used_extracted[i] = true;
            used_expected[j] = true;
            matches.push((i, j));
        }
    }
    matches
}

/// Counts per type of one case's outcome.
fn count(
    extracted: &[ExtractedMemory],
    expected: &[ExpectedMemory],
    matches: &[(usize, usize)],
) -> BTreeMap<&'static str, Counts> {
    let mut per_type: BTreeMap<&'static str, Counts> = BTreeMap::new();
    for memory in extracted {
        per_type
            .entry(memory.memory_type.as_str())
            .or_default()
            .extracted += 1;
    }
    for memory in expected {
        per_type
            .entry(memory.memory_type.as_str())
            .or_default()
            .expected += 1;
    }
    for &(_, j) in matches {
        per_type
            .entry(expected[j].memory_type.as_str())
            .or_default()
            .matched += 1;
    }
    per_type
}

/// Runs `extractor` on every case and scores it. A case the extractor fails
/// on counts as nothing extracted (its expected memories are missed) and is
/// listed in `failures`; `progress` is told each case's id as it finishes.
pub async fn evaluate(
    extractor: &EvalExtractor,
    embedder: &Embedder,
    cases: &[EvalCase],
    threshold: f32,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Report, EvalError> {
    let mut report = Report {
        cases: cases.len(),
        ..Report::default()
    };
    for case in cases {
        let extracted = match extractor.extract(&case.turns).await {
            Ok(memories) => memories,
            Err(reason) => {
                report.failures.push((case.id.clone(), reason));
                Vec::new()
            }
        };
        let texts: Vec<String> = extracted
            .iter()
            .map(|memory| memory.content.as_str().to_owned())
            .chain(case.expected.iter().map(|memory| memory.content.clone()))
            .collect();
        let mut vectors = embedder.embed(texts).await?;
        let expected_vectors = vectors.split_off(extracted.len());
        let left: Vec<(MemoryType, Vec<f32>)> = extracted
            .iter()
            .map(|memory| memory.memory_type)
            .zip(vectors)
            .collect();
        let right: Vec<(MemoryType, Vec<f32>)> = case
            .expected
            .iter()
            .map(|memory| memory.memory_type)
            .zip(expected_vectors)
            .collect();
        let matches = match_memories(&left, &right, threshold);
        for &(i, j) in &matches {
            report.importance_error_sum += u64::from(
                extracted[i]
                    .importance
                    .get()
                    .abs_diff(case.expected[j].importance),
            );
        }
        for (name, counts) in count(&extracted, &case.expected, &matches) {
            report.per_type.entry(name).or_default().add(counts);
            report.overall.add(counts);
        }
        progress(&case.id, extracted.len(), matches.len());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_is_one_to_one_same_type_and_best_first() {
        let (f, p) = (MemoryType::Factual, MemoryType::Preference);
        let extracted = vec![
            (f, vec![1.0, 0.0]),
            (f, vec![0.9, 0.1]),
            (p, vec![0.0, 1.0]),
        ];
        let expected = vec![(f, vec![1.0, 0.0]), (f, vec![0.0, 1.0])];
        // The preference is identical to the second expected but of another type.
        let matches = match_memories(&extracted, &expected, 0.6);
        assert_eq!(matches, vec![(0, 0)]);
    }

    #[test]
    fn precision_and_recall_are_undefined_without_data() {
        let counts = Counts {
            extracted: 4,
            expected: 5,
            matched: 2,
        };
        assert_eq!(counts.precision(), Some(0.5));
        assert_eq!(counts.recall(), Some(0.4));
        assert_eq!(Counts::default().precision(), None);
        assert_eq!(Counts::default().recall(), None);
    }

    #[test]
    fn the_labelled_set_parses_and_is_large_and_varied_enough() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/eval");
        let cases = load_cases(&dir).expect("the labelled set loads");
        assert!(cases.len() >= 30, "{} cases", cases.len());
        let domains: std::collections::BTreeSet<&str> =
            cases.iter().map(|case| case.domain.as_str()).collect();
        assert!(domains.len() >= 5, "{domains:?}");
        for case in &cases {
            assert!(
                !case.expected.is_empty(),
                "{} has no expected memory",
                case.id
            );
            assert!(case
                .expected
                .iter()
                .all(|m| (1..=10).contains(&m.importance)));
        }
        for kind in MemoryType::ALL {
            assert!(
                cases
                    .iter()
                    .flat_map(|case| &case.expected)
                    .any(|memory| memory.memory_type == kind),
                "no expected {kind} memory"
            );
        }
    }
}
