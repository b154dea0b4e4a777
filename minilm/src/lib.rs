//! all-MiniLM-L6-v2's forward pass: a 6-layer BERT encoder, mean pooling
//! and L2 normalisation, in plain Rust: bfloat16 weights for the linear
//! layers (see the kernel), `f32` everywhere else.
//!
//! Why not a general tensor library: the texts this service embeds are
//! short (a 10-word query is 12 tokens), and for matrices that thin a
//! general matrix multiplication spends more time packing the weights than
//! multiplying them (BENCHMARKS.md has the profile). Here the weights are
//! laid out once, at load, in the order the kernel reads them, so nothing
//! is packed or copied per call, and every weight is read once per layer
//! whatever the number of tokens. The tokens of all
//! texts of a batch go through each linear layer together, without padding;
//! only attention looks at one text at a time.
//!
//! Tokenisation is the caller's: [`MiniLm::embed`] takes token ids.

mod kernel;

use safetensors::SafeTensors;

pub use kernel::{linear, Bf16Rows};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model.safetensors is not a safetensors file: {0}")]
    Format(#[from] safetensors::SafeTensorError),
    #[error("model.safetensors has no tensor `{0}`")]
    Missing(String),
    #[error("tensor `{name}` is {found:?}, expected {expected:?} of f32")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("config.json: {0}")]
    Config(String),
}

/// The fields of a BERT `config.json` the forward pass uses.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

/// One text to embed: its token ids and token type ids (equal lengths,
/// special tokens included, already truncated).
#[derive(Debug, Clone, Copy)]
pub struct Tokens<'a> {
    pub ids: &'a [u32],
    pub type_ids: &'a [u32],
}

struct Linear {
    /// `out × in`: row `o` holds the weights of output `o`, in bfloat16
    /// (see the kernel for why).
    weight: Bf16Rows,
    bias: Vec<f32>,
}

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    /// Query, key and value stacked: one pass over the tokens gives all three.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct MiniLm {
    config: BertConfig,
    word_embeddings: Vec<f32>,
    position_embeddings: Vec<f32>,
    token_type_embeddings: Vec<f32>,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
}

/// Reads f32 tensors by name, checking their shapes.
struct Weights<'a> {
    tensors: SafeTensors<'a>,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let view = self
            .tensors
            .tensor(name)
            .map_err(|_| ModelError::Missing(name.to_owned()))?;
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape {
            return Err(ModelError::Shape {
                name: name.to_owned(),
                found: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .collect())
    }

    fn linear(&self, prefix: &str, outputs: usize, inputs: usize) -> Result<Linear, ModelError> {
        self.stacked(&[prefix], outputs, inputs)
    }

    /// Linear layers over the same inputs as one: their outputs one after
    /// the other.
    fn stacked(
        &self,
        prefixes: &[&str],
        outputs: usize,
        inputs: usize,
    ) -> Result<Linear, ModelError> {
        let (mut weight, mut bias) = (Vec::new(), Vec::new());
        for prefix in prefixes {
            weight.extend(self.get(&format!("{prefix}.weight"), &[outputs, inputs])?);
            bias.extend(self.get(&format!("{prefix}.bias"), &[outputs])?);
        }
        Ok(Linear {
            weight: Bf16Rows::from_f32(&weight, inputs),
            bias,
        })
    }

    fn layer_norm(&self, prefix: &str, size: usize) -> Result<LayerNorm, ModelError> {
        Ok(LayerNorm {
            weight: self.get(&format!("{prefix}.weight"), &[size])?,
            bias: self.get(&format!("{prefix}.bias"), &[size])?,
        })
    }
}

impl MiniLm {
    /// Loads the weights of a BERT encoder (sentence-transformers' layout,
    /// with or without a `bert.` prefix) from a safetensors file's bytes.
    pub fn load(config: BertConfig, safetensors: &[u8]) -> Result<Self, ModelError> {
        if config.hidden_act != "gelu" {
            return Err(ModelError::Config(format!(
                "hidden_act `{}` is not supported (only gelu)",
                config.hidden_act
            )));
        }
        let hidden = config.hidden_size;
        if config.num_attention_heads == 0 || !hidden.is_multiple_of(config.num_attention_heads) {
            return Err(ModelError::Config(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {}",
                config.num_attention_heads
            )));
        }
        // The kernel's layout (weights in blocks of 4 rows and 32 inputs).
        for (name, size) in [
            ("hidden_size", hidden),
            ("intermediate_size", config.intermediate_size),
        ] {
            if size == 0 || !size.is_multiple_of(kernel::STEP) {
                return Err(ModelError::Config(format!(
                    "{name} {size} is not a multiple of {}",
                    kernel::STEP
                )));
            }
        }
        let tensors = SafeTensors::deserialize(safetensors)?;
        let prefix = if tensors.names().iter().any(|name| name.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        let weights = Weights { tensors };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let layer = format!("{prefix}encoder.layer.{index}");
            let [query, key, value] =
                ["query", "key", "value"].map(|name| format!("{layer}.attention.self.{name}"));
            let qkv = weights.stacked(&[&query, &key, &value], hidden, hidden)?;
            layers.push(Layer {
                qkv,
                attention_output: weights.linear(
                    &format!("{layer}.attention.output.dense"),
                    hidden,
                    hidden,
                )?,
                attention_norm: weights
                    .layer_norm(&format!("{layer}.attention.output.LayerNorm"), hidden)?,
                intermediate: weights.linear(
                    &format!("{layer}.intermediate.dense"),
                    config.intermediate_size,
                    hidden,
                )?,
                output: weights.linear(
                    &format!("{layer}.output.dense"),
                    hidden,
                    config.intermediate_size,
                )?,
                output_norm: weights.layer_norm(&format!("{layer}.output.LayerNorm"), hidden)?,
            });
        }
        Ok(Self {
            word_embeddings: weights.get(
                &format!("{prefix}embeddings.word_embeddings.weight"),
                &[config.vocab_size, hidden],
            )?,
            position_embeddings: weights.get(
                &format!("{prefix}embeddings.position_embeddings.weight"),
                &[config.max_position_embeddings, hidden],
            )?,
            token_type_embeddings: weights.get(
                &format!("{prefix}embeddings.token_type_embeddings.weight"),
                &[config.type_vocab_size, hidden],
            )?,
            embeddings_norm: weights
                .layer_norm(&format!("{prefix}embeddings.LayerNorm"), hidden)?,
            layers,
            config,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// The sentence embedding of each text: the encoder's last hidden states
    /// averaged over the text's tokens, L2-normalised. Panics on a token id
    /// or type id outside the vocabulary, or a text longer than the model's
    /// positions (the tokenizer truncates before).
    pub fn embed(&self, texts: &[Tokens<'_>]) -> Vec<Vec<f32>> {
        let hidden = self.config.hidden_size;
        let spans = spans(texts);
        let total: usize = texts.iter().map(|text| text.ids.len()).sum();
        let mut states = self.embeddings(texts, total);

        let mut qkv = vec![0.0; total * 3 * hidden];
        let mut context = vec![0.0; total * hidden];
        let mut projected = vec![0.0; total * hidden];
        let mut intermediate = vec![0.0; total * self.config.intermediate_size];
        for layer in &self.layers {
            linear(&states, &layer.qkv.weight, &layer.qkv.bias, &mut qkv);
            for &(start, end) in &spans {
                self.attention(
                    &qkv[start * 3 * hidden..end * 3 * hidden],
                    &mut context[start * hidden..end * hidden],
                );
            }
            linear(
                &context,
                &layer.attention_output.weight,
                &layer.attention_output.bias,
                &mut projected,
            );
            add_and_norm(
                &mut states,
                &projected,
                &layer.attention_norm,
                self.config.layer_norm_eps,
            );
            linear(
                &states,
                &layer.intermediate.weight,
                &layer.intermediate.bias,
                &mut intermediate,
            );
            intermediate.iter_mut().for_each(|x| *x = gelu(*x));
            linear(
                &intermediate,
                &layer.output.weight,
                &layer.output.bias,
                &mut projected,
            );
            add_and_norm(
                &mut states,
                &projected,
                &layer.output_norm,
                self.config.layer_norm_eps,
            );
        }

        spans
            .iter()
            .map(|&(start, end)| {
                mean_pool_normalised(&states[start * hidden..end * hidden], hidden)
            })
            .collect()
    }

    /// Word + position + token type embeddings, layer-normalised.
    fn embeddings(&self, texts: &[Tokens<'_>], total: usize) -> Vec<f32> {
        let hidden = self.config.hidden_size;
        let mut states = Vec::with_capacity(total * hidden);
        for text in texts {
            assert_eq!(text.ids.len(), text.type_ids.len(), "ids and type ids");
            assert!(
                text.ids.len() <= self.config.max_position_embeddings,
                "{} tokens: the tokenizer must truncate",
                text.ids.len()
            );
            for (position, (&id, &type_id)) in text.ids.iter().zip(text.type_ids).enumerate() {
                let word = &self.word_embeddings[id as usize * hidden..][..hidden];
                let place = &self.position_embeddings[position * hidden..][..hidden];
                let kind = &self.token_type_embeddings[type_id as usize * hidden..][..hidden];
                states.extend((0..hidden).map(|i| word[i] + place[i] + kind[i]));
            }
        }
        let zeros = vec![0.0; states.len()];
        add_and_norm(
            &mut states,
            &zeros,
            &self.embeddings_norm,
            self.config.layer_norm_eps,
        );
        states
    }

    /// Multi-head self-attention over one text: `qkv` holds its tokens'
    /// query, key and value rows; `context` receives the heads' outputs
    /// side by side. No mask: the text is not padded.
    fn attention(&self, qkv: &[f32], context: &mut [f32]) {
        let hidden = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let head_size = hidden / heads;
        let tokens = qkv.len() / (3 * hidden);
        let scale = 1.0 / (head_size as f32).sqrt();
        let mut scores = vec![0.0f32; tokens];
        for head in 0..heads {
            let offset = head * head_size;
            let query = |t: usize| &qkv[t * 3 * hidden + offset..][..head_size];
            let key = |t: usize| &qkv[t * 3 * hidden + hidden + offset..][..head_size];
            let value = |t: usize| &qkv[t * 3 * hidden + 2 * hidden + offset..][..head_size];
            for a in 0..tokens {
                let q = query(a);
                for (b, score) in scores.iter_mut().enumerate() {
                    *score = dot(q, key(b)) * scale;
                }
                softmax(&mut scores);
                let out = &mut context[a * hidden + offset..][..head_size];
                out.fill(0.0);
                for (b, &weight) in scores.iter().enumerate() {
                    for (o, v) in out.iter_mut().zip(value(b)) {
                        *o += weight * v;
                    }
                }
            }
        }
    }
}

/// Each text's (first, last + 1) row among all tokens.
fn spans(texts: &[Tokens<'_>]) -> Vec<(usize, usize)> {
    let mut start = 0;
    texts
        .iter()
        .map(|text| {
            let span = (start, start + text.ids.len());
            start = span.1;
            span
        })
        .collect()
}

/// Eight running sums, so the compiler can keep them in one vector register
/// (a single running sum must be added in order, one lane at a time).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((sum, x), y) in sums.iter_mut().zip(x).zip(y) {
            *sum += x * y;
        }
    }
    sums.iter().sum::<f32>() + tail
}

fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for value in values.iter_mut() {
        *value = (*value - max).exp();
        sum += *value;
    }
    values.iter_mut().for_each(|value| *value /= sum);
}

/// BERT's exact GELU: x Φ(x) = x (1 + erf(x / √2)) / 2.
///
/// libm's `erff` took a fifth of a query's forward pass (a branchy call per
/// value, 110,000 values per query); this is straight-line arithmetic that
/// the compiler vectorises, within 5e-7 of the libm GELU (tested against 1e-6), far
/// below what rounding the weights changes.
#[inline]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
#[inline]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    // erf(4) is 1 - 1.5e-8: beyond it the result is ±1 in f32 anyway.
    let a = x.abs().min(4.0);
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * exp_of_negative(-a * a)).copysign(x)
}

/// e^x for x in [-16, 0]: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its
/// Taylor series to r^6 (relative error below 2e-7), 2^n built from its bits.
#[inline]
fn exp_of_negative(x: f32) -> f32 {
    const LN2_HIGH: f32 = 0.693_145_75;
    const LN2_LOW: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds x log2(e) to the nearest integer n (SSE2 has
    // no rounding instruction) and leaves n in the low bits of the sum, so
    // 2^n is built from bits without a float-to-int conversion, which Rust's
    // saturating `as` would do one value at a time.
    const ROUND: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let e_r = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is in [-24, 0]: its exponent field (n + 127) << 23 is that of a
    // normal f32; the shift drops the rest of the sum's bits.
    let two_to_n = f32::from_bits((shifted.to_bits() << 23).wrapping_add(127 << 23));
    e_r * two_to_n
}

/// `states = LayerNorm(states + residual)`, row by row.
fn add_and_norm(states: &mut [f32], residual: &[f32], norm: &LayerNorm, eps: f64) {
    let hidden = norm.weight.len();
    for (row, residual) in states
        .chunks_exact_mut(hidden)
        .zip(residual.chunks_exact(hidden))
    {
        row.iter_mut().zip(residual).for_each(|(x, r)| *x += r);
        let mean = row.iter().map(|&x| f64::from(x)).sum::<f64>() / hidden as f64;
        let variance = row
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / hidden as f64;
        let inverse = 1.0 / (variance + eps).sqrt();
        for ((x, weight), bias) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *x = ((f64::from(*x) - mean) * inverse) as f32 * weight + bias;
        }
    }
}

fn mean_pool_normalised(states: &[f32], hidden: usize) -> Vec<f32> {
    let tokens = states.len() / hidden;
    let mut mean = vec![0.0f32; hidden];
    for row in states.chunks_exact(hidden) {
        mean.iter_mut().zip(row).for_each(|(m, x)| *m += x);
    }
    mean.iter_mut().for_each(|m| *m /= tokens as f32);
    let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        mean.iter_mut().for_each(|m| *m /= norm);
    }
    mean
}

/// Loads config.json's fields.
pub fn parse_config(json: &[u8]) -> Result<BertConfig, ModelError> {
    serde_json::from_slice(json).map_err(|err| ModelError::Config(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut values = [1.0, 2.0, 3.0, 4.0];
        softmax(&mut values);
        assert!((values.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(
            values.windows(2).all(|pair| pair[0] < pair[1]),
            "{values:?}"
        );
        // Large scores do not overflow.
        let mut large = [1000.0, 1001.0];
        softmax(&mut large);
        assert!((large[1] - 0.731_058_6).abs() < 1e-6, "{large:?}");
    }

    #[test]
    fn gelu_matches_known_values() {
        // x Φ(x) from the normal distribution's CDF.
        for (x, expected) in [
            (0.0, 0.0),
            (1.0, 0.841_344_7),
            (-1.0, -0.158_655_3),
            (3.0, 2.995_950_3),
        ] {
            assert!((gelu(x) - expected).abs() < 1e-6, "gelu({x}) = {}", gelu(x));
        }
    }

    #[test]
    fn gelu_matches_libm_everywhere() {
        let mut worst = 0.0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            let exact = 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            worst = worst.max((gelu(x) - exact).abs());
        }
        assert!(
            worst < 1e-6,
            "largest difference from libm's GELU: {worst:e}"
        );
        assert_eq!(gelu(-100.0), 0.0);
        assert_eq!(gelu(100.0), 100.0);
    }

    #[test]
    fn exp_of_negative_matches_std() {
        for i in 0..=16_000 {
            let x = -(i as f32) * 1e-3;
            let relative = (exp_of_negative(x) - x.exp()).abs() / x.exp();
            assert!(relative < 5e-7, "exp({x}): relative error {relative:e}");
        }
    }

    #[test]
    fn layer_norm_centres_and_scales() {
        let norm = LayerNorm {
            weight: vec![1.0; 4],
            bias: vec![0.5; 4],
        };
        let mut states = vec![1.0, 2.0, 3.0, 4.0];
        add_and_norm(&mut states, &[0.0; 4], &norm, 1e-12);
        let mean: f32 = states.iter().sum::<f32>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-6, "{states:?}");
        let variance: f32 = states.iter().map(|x| (x - 0.5).powi(2)).sum::<f32>() / 4.0;
        assert!((variance - 1.0).abs() < 1e-5, "{states:?}");
    }

    #[test]
    fn a_shape_the_kernel_cannot_lay_out_is_a_config_error() {
        let config = BertConfig {
            vocab_size: 10,
            hidden_size: 36,
            num_hidden_layers: 1,
            num_attention_heads: 6,
            intermediate_size: 64,
            max_position_embeddings: 8,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
        };
        // Refused before the weights are read.
        let Err(ModelError::Config(message)) = MiniLm::load(config, b"") else {
            panic!("expected a config error");
        };
        assert!(message.contains("hidden_size 36"), "{message}");
    }

    #[test]
    fn spans_follow_the_texts() {
        let ids = [1u32, 2, 3];
        let texts = [
            Tokens {
                ids: &ids[..2],
                type_ids: &ids[..2],
            },
            Tokens {
                ids: &ids,
                type_ids: &ids,
            },
        ];
        assert_eq!(spans(&texts), vec![(0, 2), (2, 5)]);
    }
}
