//! One extraction with an LLM: one call normally, a second one only to
//! repair an answer that failed validation.

use std::time::Duration;

use crate::prompt::{self, ExtractionOutput, OutputError, PromptInput};
use crate::provider::{
    call_with_retries, CallError, ChatMessage, LlmRequest, Provider, RetryPolicy, Role, TokenUsage,
};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Call(#[from] CallError),
    /// Still invalid after the repair turn.
    #[error("{provider} output invalid after one repair attempt: {error} (first answer: {first})")]
    Invalid {
        provider: &'static str,
        first: OutputError,
        error: OutputError,
    },
}

impl ExtractError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ExtractError::Call(err) if err.is_transient())
    }
}

/// An extraction's outcome and what it cost, whatever the outcome.
#[derive(Debug)]
pub struct LlmRun {
    pub result: Result<ExtractionOutput, ExtractError>,
    pub usage: TokenUsage,
    /// HTTP requests sent, retries included.
    pub requests: u32,
    /// The waits between retries.
    pub retry_waits: Vec<Duration>,
    /// Whether the answer needed the repair turn.
    pub repaired: bool,
}

pub async fn extract(
    provider: &dyn Provider,
    policy: &RetryPolicy,
    input: &PromptInput<'_>,
) -> LlmRun {
    let mut run = LlmRun {
        result: Ok(ExtractionOutput {
            memories: Vec::new(),
            resolved_issue_ids: Vec::new(),
        }),
        usage: TokenUsage::default(),
        requests: 0,
        retry_waits: Vec::new(),
        repaired: false,
    };
    let mut request = LlmRequest {
        output_name: prompt::OUTPUT_NAME,
        system: prompt::system_prompt(input),
        messages: vec![ChatMessage {
            role: Role::User,
            content: prompt::transcript_message(input.turns),
        }],
        schema: prompt::output_schema(),
    };
    let first = match call(provider, &request, policy, &mut run).await {
        Ok(text) => text,
        Err(err) => {
            run.result = Err(err.into());
            return run;
        }
    };
    let first_error = match prompt::parse_output(&first, input.open_issues) {
        Ok(output) => {
            run.result = Ok(output);
            return run;
        }
        Err(error) => error,
    };
    tracing::warn!(provider = provider.name(), error = %first_error, "invalid LLM output; asking for a repair");
    run.repaired = true;
    request.messages.push(ChatMessage {
        role: Role::Assistant,
        content: if first.trim().is_empty() {
            "(empty)".to_owned()
        } else {
            first
        },
    });
    request.messages.push(ChatMessage {
        role: Role::User,
        content: prompt::repair_message(&first_error),
    });
    run.result = match call(provider, &request, policy, &mut run).await {
        Err(err) => Err(err.into()),
        Ok(second) => prompt::parse_output(&second, input.open_issues).map_err(|error| {
            ExtractError::Invalid {
                provider: provider.name(),
                first: first_error,
                error,
            }
        }),
    };
    run
}

async fn call(
    provider: &dyn Provider,
    request: &LlmRequest,
    policy: &RetryPolicy,
    run: &mut LlmRun,
) -> Result<String, CallError> {
    let (result, report) = call_with_retries(provider, request, policy).await;
    run.requests += report.requests;
    run.retry_waits.extend(report.waits);
    let answer = result?;
    run.usage += answer.usage;
    Ok(answer.text)
}
