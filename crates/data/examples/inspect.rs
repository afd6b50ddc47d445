//! `cargo run -p afinar-data --example inspect -- DATA TEMPLATE [MAX_SEQ_LEN] [SAMPLES]`: the
//! library side of `afinar data inspect` with the project tokenizer (the CLI is in afinar-trainer).

use std::io::IsTerminal;
use std::path::PathBuf;

use afinar_data::{inspect, render_report, InspectOptions, MaskMode, Overflow, TextTokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(data), Some(template)) = (args.first(), args.get(1)) else {
        return Err("usage: inspect DATA TEMPLATE [MAX_SEQ_LEN] [SAMPLES]".into());
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tok = TextTokenizer::open(&root.join("tests/fixtures/tokenizer"))?;
    let opts = InspectOptions {
        data: data.into(),
        format: None,
        template: template.parse()?,
        mask: MaskMode::Assistant,
        max_seq_len: args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1024),
        overflow: Overflow::Truncate,
        samples: args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2),
    };
    let report = inspect(&opts, &tok)?;
    let stdout = std::io::stdout();
    render_report(&report, &mut stdout.lock(), stdout.is_terminal())?;
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}
