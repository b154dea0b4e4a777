//! The quality of deduplication on a labelled set of pairs
//! (tests/data/dedup_pairs.jsonl): recall of duplicates, precision of
//! merges, conflicts found, contradictions merged. Shared by the test that
//! holds `rules` mode to its measured numbers and by `elaaoms eval-dedup`,
//! which measures what an LLM judge adds.
//!
//! Stage 1 is modelled as the indexer applies it: a pair less similar than
//! the candidate bar is never judged, so it stays distinct whatever stage 2
//! would say. Recall is therefore capped by stage 1, for any judge.

use std::fmt;

use elaaoms_extractor::provider::{Provider, RetryPolicy, TokenUsage};
use elaaoms_shared::domain::MemoryType;
use elaaoms_shared::embedder::{Embedder, EmbedderError};
use serde::{Deserialize, Deserializer};

use crate::dedup::{cosine, Decision, RulesThresholds};
use crate::judge::{judge_pairs, PairToJudge, Verdicts};

/// Stage 1's bar, the indexer's default (`DedupSettings::default()`).
pub const CANDIDATE_SIMILARITY: f64 = 0.6;

/// About as many pairs as one extraction sends the judge.
pub const DEFAULT_BATCH_SIZE: usize = 20;

/// One line of the labelled set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LabelledPair {
    pub existing: String,
    pub new: String,
    #[serde(rename = "type")]
    pub memory_type: MemoryType,
    /// What stage 2 should decide.
    #[serde(deserialize_with = "decision")]
    pub label: Decision,
}

fn decision<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decision, D::Error> {
    let label = String::deserialize(deserializer)?;
    [Decision::Duplicate, Decision::Conflict, Decision::Distinct]
        .into_iter()
        .find(|decision| decision.as_str() == label)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "label {label:?} is not duplicate, conflict or distinct"
            ))
        })
}

#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    #[error("labelled pair on line {line}: {source}")]
    Pair {
        line: usize,
        source: serde_json::Error,
    },
    #[error("embedding the labelled pairs: {0}")]
    Embedding(#[from] EmbedderError),
}

/// Reads JSON lines (blank lines skipped).
pub fn load_pairs(text: &str) -> Result<Vec<LabelledPair>, QualityError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line).map_err(|source| QualityError::Pair {
                line: index + 1,
                source,
            })
        })
        .collect()
}

/// The cosine similarity of each pair's two texts, in order.
pub async fn similarities(
    embedder: &Embedder,
    pairs: &[LabelledPair],
) -> Result<Vec<f64>, QualityError> {
    let texts = pairs
        .iter()
        .flat_map(|pair| [pair.existing.clone(), pair.new.clone()])
        .collect();
    let vectors = embedder.embed(texts).await?;
    // The embedder's vectors are normalised: the dot product is the cosine.
    Ok(vectors
        .chunks(2)
        .map(|two| cosine(&two[0], &two[1]))
        .collect())
}

/// A pair stage 2 decided otherwise than its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Miss {
    pub label: Decision,
    pub decision: Decision,
    pub similarity: f64,
    pub existing: String,
    pub new: String,
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MISS {:9} -> {:9} {:.3}  {:?} | {:?}",
            self.label.as_str(),
            self.decision.as_str(),
            self.similarity,
            self.existing,
            self.new
        )
    }
}

/// What the LLM judge answered over all its calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JudgeCoverage {
    /// Pairs sent (those at or above the candidate bar).
    pub asked: usize,
    /// Pairs it gave a verdict for; the rules decided the others.
    pub answered: usize,
    pub calls: usize,
    /// Calls that failed after their retries: all their pairs went to the rules.
    pub failed_calls: usize,
    pub usage: TokenUsage,
}

/// The numbers of one run of stage 1 and 2 over the labelled set.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityReport {
    /// What decided stage 2, for the heading.
    pub mode: String,
    pub candidate_similarity: f64,
    /// The rules' duplicate bar (the `cosine alone` lines compare to it).
    pub duplicate_bar: f64,
    pub pairs: usize,
    pub duplicates: usize,
    pub conflicts: usize,
    pub distinct: usize,
    pub found_duplicates: usize,
    /// Duplicates at or above the candidate bar: the most any judge can find.
    pub duplicates_past_stage_1: usize,
    /// Duplicates at or above the duplicate bar.
    pub duplicates_above_bar: usize,
    /// Conflict or distinct pairs at or above the duplicate bar.
    pub cosine_alone_false_merges: usize,
    pub merged: usize,
    pub merged_right: usize,
    pub found_conflicts: usize,
    pub false_merges_of_conflicts: usize,
    pub distinct_merged: usize,
    pub distinct_conflicted: usize,
    pub misses: Vec<Miss>,
    /// Set when an LLM judged stage 2.
    pub judge: Option<JudgeCoverage>,
}

impl QualityReport {
    pub fn recall(&self) -> f64 {
        self.found_duplicates as f64 / self.duplicates as f64
    }

    pub fn precision(&self) -> f64 {
        self.merged_right as f64 / self.merged.max(1) as f64
    }
}

impl fmt::Display for QualityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            duplicates,
            conflicts,
            distinct,
            ..
        } = *self;
        writeln!(
            f,
            "== {}, candidate bar {}",
            self.mode, self.candidate_similarity
        )?;
        writeln!(
            f,
            "pairs: {} ({duplicates} duplicate, {conflicts} conflict, {distinct} distinct)",
            self.pairs
        )?;
        writeln!(
            f,
            "duplicates detected (recall): {}/{duplicates} = {:.3}",
            self.found_duplicates,
            self.recall()
        )?;
        writeln!(
            f,
            "duplicates at or above the candidate bar (stage 1 lets through): {}/{duplicates}",
            self.duplicates_past_stage_1
        )?;
        writeln!(
            f,
            "duplicates at or above the bar by cosine alone: {}/{duplicates}",
            self.duplicates_above_bar
        )?;
        writeln!(
            f,
            "conflict or distinct pairs that cosine alone would merge: {}",
            self.cosine_alone_false_merges
        )?;
        writeln!(
            f,
            "precision of merges: {}/{} = {:.3}",
            self.merged_right,
            self.merged,
            self.precision()
        )?;
        writeln!(
            f,
            "conflicts detected: {}/{conflicts}",
            self.found_conflicts
        )?;
        writeln!(
            f,
            "contradictions merged as duplicates: {}",
            self.false_merges_of_conflicts
        )?;
        write!(
            f,
            "distinct pairs merged: {}; distinct pairs taken for conflicts: {}",
            self.distinct_merged, self.distinct_conflicted
        )?;
        if let Some(judge) = &self.judge {
            write!(
                f,
                "\njudge answered {} of {} pairs (the rules decided the rest); \
                 {} call(s), {} failed; tokens: {} input, {} output",
                judge.answered,
                judge.asked,
                judge.calls,
                judge.failed_calls,
                judge.usage.input,
                judge.usage.output
            )?;
        }
        Ok(())
    }
}

/// Runs stage 1 (the candidate bar) and stage 2 (`decide`, given the pair's
/// index and similarity) over `pairs`. `rules` are the thresholds of the
/// rules that decide (or that a judge falls back to); `mode` names stage 2.
pub fn evaluate(
    mode: impl Into<String>,
    pairs: &[LabelledPair],
    similarities: &[f64],
    rules: RulesThresholds,
    decide: impl Fn(usize, f64) -> Decision,
) -> QualityReport {
    let count = |label: Decision| pairs.iter().filter(|p| p.label == label).count();
    let mut report = QualityReport {
        mode: mode.into(),
        candidate_similarity: CANDIDATE_SIMILARITY,
        duplicate_bar: rules.duplicate,
        pairs: pairs.len(),
        duplicates: count(Decision::Duplicate),
        conflicts: count(Decision::Conflict),
        distinct: count(Decision::Distinct),
        found_duplicates: 0,
        duplicates_past_stage_1: 0,
        duplicates_above_bar: 0,
        cosine_alone_false_merges: 0,
        merged: 0,
        merged_right: 0,
        found_conflicts: 0,
        false_merges_of_conflicts: 0,
        distinct_merged: 0,
        distinct_conflicted: 0,
        misses: Vec::new(),
        judge: None,
    };
    for (index, (pair, &similarity)) in pairs.iter().zip(similarities).enumerate() {
        let candidate = similarity >= CANDIDATE_SIMILARITY;
        let decision = if candidate {
            decide(index, similarity)
        } else {
            Decision::Distinct
        };
        if candidate && pair.label == Decision::Duplicate {
            report.duplicates_past_stage_1 += 1;
        }
        if similarity >= rules.duplicate {
            match pair.label {
                Decision::Duplicate => report.duplicates_above_bar += 1,
                _ => report.cosine_alone_false_merges += 1,
            }
        }
        match (pair.label, decision) {
            (Decision::Duplicate, Decision::Duplicate) => {
                report.merged += 1;
                report.merged_right += 1;
                report.found_duplicates += 1;
            }
            (Decision::Conflict, Decision::Conflict) => report.found_conflicts += 1,
            (Decision::Conflict, Decision::Duplicate) => {
                report.merged += 1;
                report.false_merges_of_conflicts += 1;
            }
            (Decision::Distinct, Decision::Duplicate) => {
                report.merged += 1;
                report.distinct_merged += 1;
            }
            (Decision::Distinct, Decision::Conflict) => report.distinct_conflicted += 1,
            _ => {}
        }
        if decision != pair.label {
            report.misses.push(Miss {
                label: pair.label,
                decision,
                similarity,
                existing: pair.existing.clone(),
                new: pair.new.clone(),
            });
        }
    }
    report
}

/// The LLM judge's verdicts for the pairs stage 1 lets through, asked in
/// batches (one call each, as the indexer calls once per extraction).
#[derive(Debug)]
pub struct JudgedPairs {
    /// Per pair of the set: the verdicts of the batch it was sent in.
    batch_of: Vec<Option<usize>>,
    batches: Vec<Verdicts>,
    pub coverage: JudgeCoverage,
    /// Why each failed call failed, for the operator.
    pub failures: Vec<String>,
}

impl JudgedPairs {
    /// The judge's verdict for pair `index`, or the rules' when it gave none.
    pub fn decide(
        &self,
        pairs: &[LabelledPair],
        index: usize,
        similarity: f64,
        rules: RulesThresholds,
    ) -> Decision {
        let pair = &pairs[index];
        let none = Verdicts::default();
        let verdicts = self.batch_of[index].map_or(&none, |batch| &self.batches[batch]);
        verdicts.decide(&pair.existing, &pair.new, similarity, rules)
    }
}

/// Sends the pairs at or above the candidate bar to `provider`,
/// `batch_size` per call. A failed call is recorded, and its pairs are left
/// to the rules, as in the indexer.
pub async fn judge_in_batches(
    provider: &dyn Provider,
    policy: &RetryPolicy,
    pairs: &[LabelledPair],
    similarities: &[f64],
    batch_size: usize,
) -> JudgedPairs {
    let candidates: Vec<usize> = (0..pairs.len())
        .filter(|&index| similarities[index] >= CANDIDATE_SIMILARITY)
        .collect();
    let mut judged = JudgedPairs {
        batch_of: vec![None; pairs.len()],
        batches: Vec::new(),
        coverage: JudgeCoverage {
            asked: candidates.len(),
            ..JudgeCoverage::default()
        },
        failures: Vec::new(),
    };
    for batch in candidates.chunks(batch_size.max(1)) {
        let to_judge: Vec<PairToJudge> = batch
            .iter()
            .map(|&index| PairToJudge {
                existing: pairs[index].existing.clone(),
                new: pairs[index].new.clone(),
                memory_type: pairs[index].memory_type,
                similarity: similarities[index],
            })
            .collect();
        judged.coverage.calls += 1;
        let verdicts = match judge_pairs(provider, policy, &to_judge).await {
            Ok(answer) => {
                judged.coverage.usage += answer.usage;
                // Verdicts are keyed by the two texts, which are unique
                // within a batch of the labelled set.
                judged.coverage.answered += answer.verdicts.len();
                answer.verdicts
            }
            Err(err) => {
                judged.coverage.failed_calls += 1;
                judged.failures.push(err.to_string());
                Verdicts::default()
            }
        };
        let batch_index = judged.batches.len();
        judged.batches.push(verdicts);
        for &index in batch {
            judged.batch_of[index] = Some(batch_index);
        }
    }
    judged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::DedupSettings;

    #[test]
    fn stage_1_is_the_indexers() {
        assert_eq!(
            CANDIDATE_SIMILARITY,
            DedupSettings::default().candidate_similarity
        );
    }

    #[test]
    fn a_bad_label_names_its_line() {
        let text = "\n{\"existing\": \"a\", \"new\": \"b\", \"type\": \"factual\", \"label\": \"duplicate\"}\n\
                    {\"existing\": \"a\", \"new\": \"c\", \"type\": \"factual\", \"label\": \"same\"}\n";
        let err = load_pairs(text).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("\"same\""), "{err}");
        let pairs = load_pairs(&text.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
        assert_eq!(pairs[0].label, Decision::Duplicate);
        assert_eq!(pairs[0].memory_type, MemoryType::Factual);
    }

    fn pair(label: Decision) -> LabelledPair {
        LabelledPair {
            existing: "a".to_owned(),
            new: "b".to_owned(),
            memory_type: MemoryType::Factual,
            label,
        }
    }

    #[test]
    fn below_the_candidate_bar_nothing_is_judged() {
        let pairs = [
            pair(Decision::Duplicate),
            pair(Decision::Duplicate),
            pair(Decision::Conflict),
        ];
        // A judge that merges everything it sees.
        let report = evaluate(
            "merge all",
            &pairs,
            &[0.59, 0.9, 0.7],
            RulesThresholds::default(),
            |_, _| Decision::Duplicate,
        );
        assert_eq!(report.found_duplicates, 1);
        assert_eq!(report.duplicates_past_stage_1, 1);
        assert_eq!(report.duplicates_above_bar, 1);
        assert_eq!(report.false_merges_of_conflicts, 1);
        assert_eq!((report.merged_right, report.merged), (1, 2));
        assert_eq!(report.recall(), 0.5);
        assert_eq!(report.misses.len(), 2, "{:?}", report.misses);
        assert!(report
            .to_string()
            .contains("duplicates detected (recall): 1/2 = 0.500"));
    }
}
