//! OpenTelemetry traces over OTLP/gRPC: one server span per proxied request
//! with a client span for the upstream call, one span per WebSocket tunnel
//! covering its whole life; W3C `traceparent`/`tracestate` continued from the
//! client and injected toward the upstream.
//!
//! The exporter never blocks the proxy: ended spans go into a bounded queue
//! ([`QueueProcessor`]); when it is full, or when the collector fails an
//! export, spans are dropped and counted (`charon_trace_spans_dropped_total`)
//! and the node keeps serving.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use super::metrics::Metrics;

/// Ended spans waiting for export; beyond this they are dropped.
const QUEUE: usize = 4096;
/// Spans per export call.
const BATCH: usize = 512;

pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
}

/// What the node says about itself in every span's resource.
pub struct NodeFacts<'a> {
    pub node_name: &'a str,
    pub node_id: &'a str,
    pub region: &'a str,
}

impl Tracing {
    /// Starts the exporter toward `endpoint` (e.g. `http://collector:4317`).
    /// Must run inside the tokio runtime. `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER(_ARG)` apply.
    pub fn start(
        endpoint: &str,
        facts: NodeFacts<'_>,
        metrics: Arc<Metrics>,
    ) -> Result<Tracing, String> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("cannot build the OTLP exporter for {endpoint}: {e}"))?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("charon");
        }
        let resource = resource
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", facts.node_id.to_string()),
                KeyValue::new("host.name", facts.node_name.to_string()),
                KeyValue::new("charon.node.name", facts.node_name.to_string()),
                KeyValue::new("charon.node.id", facts.node_id.to_string()),
                KeyValue::new("charon.node.region", facts.region.to_string()),
            ])
            .build();
        // The exporter moves into the queue's task, so it learns the
        // resource here rather than through the provider.
        exporter.set_resource(&resource);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor::start(exporter, metrics))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("charon");
        Ok(Tracing {
            tracer,
            provider,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// Starts the server span of a request, continuing the client's trace.
    pub fn server_span(&self, headers: &HeaderMap, name: String, attrs: Vec<KeyValue>) -> Context {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// A child span of `parent` (the upstream call, or a tunnel), with its
    /// context injected into `headers` when given.
    pub fn child_span(
        &self,
        parent: &Context,
        name: String,
        kind: SpanKind,
        attrs: Vec<KeyValue>,
        headers: Option<&mut HeaderMap>,
    ) -> Context {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, parent);
        let cx = parent.with_span(span);
        if let Some(h) = headers {
            self.propagator.inject_context(&cx, &mut HeadersMut(h));
        }
        cx
    }

    /// Exports what is queued, for a clean exit.
    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
    }
}

/// Ends `cx`'s span with these attributes; an error status when `error`.
pub fn end(cx: &Context, attrs: Vec<KeyValue>, error: Option<String>) {
    let span = cx.span();
    span.set_attributes(attrs);
    if let Some(e) = error {
        span.set_status(opentelemetry::trace::Status::error(e));
    }
    span.end();
}

pub fn add_event(cx: &Context, name: &'static str, attrs: Vec<KeyValue>) {
    cx.span().add_event(name, attrs);
}

/// An event that happened earlier than now (the span is ended later).
pub fn add_event_at(cx: &Context, name: &'static str, at: std::time::SystemTime) {
    cx.span().add_event_with_timestamp(name, at, vec![]);
}

pub fn trace_id(cx: &Context) -> String {
    cx.span().span_context().trace_id().to_string()
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// A span processor with a bounded queue and drop counting, exporting from
/// its own task.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
    metrics: Arc<MetricsRef>,
}

/// `Metrics` is not `Debug`; the processor must be.
struct MetricsRef(Arc<Metrics>);

impl std::fmt::Debug for MetricsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl QueueProcessor {
    fn start<E: SpanExporter + 'static>(exporter: E, metrics: Arc<Metrics>) -> QueueProcessor {
        let (tx, mut rx) = mpsc::channel::<SpanData>(QUEUE);
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while let Some(first) = rx.recv().await {
                batch.push(first);
                // Gather what else is there (or arrives within a moment).
                let gather = tokio::time::sleep(Duration::from_millis(200));
                tokio::pin!(gather);
                while batch.len() < BATCH {
                    tokio::select! {
                        s = rx.recv() => match s {
                            Some(s) => batch.push(s),
                            None => break,
                        },
                        _ = &mut gather => break,
                    }
                }
                let n = batch.len() as u64;
                if let Err(e) = exporter.export(std::mem::take(&mut batch)).await {
                    m.spans_dropped.fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(error = %e, spans = n, "OTLP export failed; spans dropped");
                }
            }
        });
        QueueProcessor {
            tx,
            metrics: Arc::new(MetricsRef(metrics)),
        }
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.metrics.0.spans_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}
