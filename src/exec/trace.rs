//! A timeline of the executor's operations as a Chrome trace (JSON object format, which
//! Perfetto and chrome://tracing open): one complete ("X") event per load, compute and store,
//! each kind on its own track.

use std::time::Instant;

use serde_json::json;

/// The track an operation is drawn on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// Kernels on the device.
    Compute,
    /// Weights streamed to the GPU.
    LoadWeight,
    /// KV cache brought to the GPU.
    LoadCache,
    /// Activations brought to the GPU (and the embedding lookup).
    LoadActivation,
    /// New KV-cache rows written back to their tiers.
    StoreCache,
    /// Activations moved to their tiers.
    StoreActivation,
}

impl Track {
    /// Every track, in drawing order.
    pub const ALL: [Track; 6] = [
        Track::Compute,
        Track::LoadWeight,
        Track::LoadCache,
        Track::LoadActivation,
        Track::StoreCache,
        Track::StoreActivation,
    ];

    fn name(self) -> &'static str {
        match self {
            Track::Compute => "compute",
            Track::LoadWeight => "load weight",
            Track::LoadCache => "load cache",
            Track::LoadActivation => "load activation",
            Track::StoreCache => "store cache",
            Track::StoreActivation => "store activation",
        }
    }
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// Its track.
    pub track: Track,
    /// What ran (the plan's operation).
    pub name: String,
    /// Microseconds since the trace began.
    pub start_us: f64,
    /// Duration in microseconds.
    pub dur_us: f64,
}

/// Spans recorded so far.
#[derive(Debug, Clone)]
pub struct Trace {
    origin: Instant,
    /// The spans, in the order they ended.
    pub spans: Vec<Span>,
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}

impl Trace {
    /// An empty trace starting now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            spans: Vec::new(),
        }
    }

    /// Records an operation that ran from `start` to `end`.
    pub fn span(&mut self, track: Track, name: String, start: Instant, end: Instant) {
        let us = |t: Instant| t.saturating_duration_since(self.origin).as_secs_f64() * 1e6;
        self.spans.push(Span {
            track,
            name,
            start_us: us(start),
            dur_us: us(end) - us(start),
        });
    }

    /// Total time per track, in seconds.
    pub fn busy_seconds(&self, track: Track) -> f64 {
        self.spans
            .iter()
            .filter(|s| s.track == track)
            .map(|s| s.dur_us)
            .sum::<f64>()
            / 1e6
    }

    /// The Chrome trace JSON.
    pub fn to_chrome_json(&self) -> String {
        let tid = |t: Track| Track::ALL.iter().position(|&x| x == t).unwrap_or(0) + 1;
        let mut events: Vec<serde_json::Value> = Track::ALL
            .iter()
            .map(|&t| {
                json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid(t),
                       "args": {"name": t.name()}})
            })
            .collect();
        events.extend(self.spans.iter().map(|s| {
            json!({"name": s.name, "cat": s.track.name(), "ph": "X", "pid": 1,
                   "tid": tid(s.track), "ts": s.start_us, "dur": s.dur_us})
        }));
        json!({"traceEvents": events, "displayTimeUnit": "ms"}).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chrome_json_has_one_event_per_span_on_named_tracks() {
        let mut t = Trace::new();
        let a = Instant::now();
        t.span(
            Track::LoadWeight,
            "load_weight(i=0, j=1)".into(),
            a,
            a + std::time::Duration::from_micros(250),
        );
        t.span(
            Track::Compute,
            "compute(i=0, j=0, k=0)".into(),
            a,
            a + std::time::Duration::from_micros(100),
        );
        let v: serde_json::Value = serde_json::from_str(&t.to_chrome_json()).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        let spans: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0]["name"], "load_weight(i=0, j=1)");
        assert!((spans[0]["dur"].as_f64().unwrap() - 250.0).abs() < 1.0);
        assert_ne!(spans[0]["tid"], spans[1]["tid"]);
        let names: Vec<_> = events
            .iter()
            .filter(|e| e["ph"] == "M")
            .map(|e| e["args"]["name"].clone())
            .collect();
        assert_eq!(names.len(), 6);
        assert!((t.busy_seconds(Track::Compute) - 1e-4).abs() < 1e-6);
    }
}
