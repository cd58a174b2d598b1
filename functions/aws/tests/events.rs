//! Every sample event in `events/` is what its function accepts (so `cargo lambda invoke
//! --data-file events/…` works): API events parse as HTTP API requests for the FHIR routes (the
//! moto tests send each to the API handler), SQS events carry valid work or coordinator messages.

use export_aws::aws_lambda_events::event::sqs::SqsEvent;
use export_aws::fanout::WorkMessage;
use export_aws::handlers::{CoordinatorAction, CoordinatorMessage};
use std::path::PathBuf;

fn events() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_sample_event_matches_its_function() {
    let all = events();
    assert!(all.len() >= 10, "events/ holds samples for every function");
    for (name, text) in all {
        if name.starts_with("api-") {
            let request = export_aws::lambda_http::request::from_str(&text)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(request.uri().path().starts_with("/fhir/"), "{name}");
        } else {
            let event: SqsEvent =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(event.records.len(), 1, "{name}");
            let body = event.records[0].body.as_deref().unwrap();
            if name.contains("dead-letter") {
                // The coordinator consumes the work dead-letter queue: work messages.
                serde_json::from_str::<WorkMessage>(body).unwrap_or_else(|e| panic!("{name}: {e}"));
            } else if name.starts_with("worker-") {
                let message: WorkMessage =
                    serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(
                    message.resume.is_some(),
                    name.contains("continuation"),
                    "{name}"
                );
            } else {
                let message: CoordinatorMessage =
                    serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}"));
                let expected = match message.action {
                    CoordinatorAction::Plan => "plan",
                    CoordinatorAction::Await => "await",
                    CoordinatorAction::Finalize => "finalize",
                    CoordinatorAction::Fail => "fail",
                };
                assert!(name.contains(expected), "{name}");
            }
        }
    }
}
