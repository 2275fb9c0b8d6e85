//! Embedding offload with a task of your own.
//!
//! ```sh
//! cargo run --release --example custom_task
//! curl -s -X POST localhost:8080/v1/jobs -H 'content-type: application/json' \
//!      -d '{"task": "word_count", "args": {"text": "to be or not to be"}}'
//! ```

use async_trait::async_trait;
use offload::config::Settings;
use offload::job::Kind;
use offload::task::{JobCtx, Task, TaskError, TaskResult};
use offload::{App, Registry};
use serde_json::{json, Value};

/// Counts words: a cpu task, so it runs on the rayon pool.
struct WordCount;

#[async_trait]
impl Task for WordCount {
    fn name(&self) -> &str {
        "word_count"
    }
    fn description(&self) -> &str {
        "Counts the words of `text` and the most frequent one."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Cpu]
    }
    fn args_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 1_000_000}},
            "required": ["text"],
            "additionalProperties": false
        })
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        let text = args["text"]
            .as_str()
            .ok_or_else(|| TaskError::Permanent("text must be a string".into()))?;
        let mut counts = std::collections::HashMap::new();
        for (i, word) in text.split_whitespace().enumerate() {
            if i % 10_000 == 0 {
                ctx.check()?; // stop promptly on cancel or timeout
            }
            *counts.entry(word.to_lowercase()).or_insert(0u64) += 1;
        }
        let top = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(w, _)| w.clone());
        Ok(json!({ "words": counts.values().sum::<u64>(), "top": top }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The process lane starts workers by re-executing this binary: answer as one if asked.
    if let Some(code) = offload::executor::process::run_worker_if_asked() {
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    tokio::runtime::Runtime::new()?.block_on(serve())
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    offload::telemetry::init(offload::config::LogFormat::Text);
    let settings = Settings::with_data_dir("./offload-data");
    let mut registry = Registry::builtin(&settings);
    registry.register(WordCount);
    let app = App::build(settings, registry).await?;
    app.run(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
