//! W3C trace context (`traceparent`) between `tracing` spans and the stream header, so that one
//! client request is one trace across nodes.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::{OpenTelemetrySpanExt, SetParentError};

const TRACEPARENT: &str = "traceparent";

/// A `traceparent` is 55 characters in version 00; later versions may append fields. Anything
/// much longer is not worth parsing.
const MAX_TRACEPARENT_LENGTH: usize = 256;

/// The `traceparent` of the current span, to put in an outgoing stream header.
///
/// `None` when no OpenTelemetry layer is installed (no endpoint), or when the current span is not
/// seen by it. An unsampled span still gives its `traceparent` (flags `00`): the receiving node
/// then honours the decision instead of starting a new, sampled trace.
pub fn current_traceparent() -> Option<String> {
    traceparent_of_span(&tracing::Span::current())
        // The current span may be one the trace filter drops (a debug span, another crate's);
        // the context entered last by a span the layer sees is then the right parent.
        .or_else(|| traceparent_of_context(&Context::current()))
}

/// The `traceparent` of `span` (see [`current_traceparent`]).
///
/// This starts the OpenTelemetry span: call [`set_parent_from_traceparent`] on it before.
pub fn traceparent_of_span(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    traceparent_of_context(&span.context())
}

fn traceparent_of_context(context: &Context) -> Option<String> {
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span named by `traceparent` (from a stream header).
///
/// No-op for `None`, an invalid value, or when no OpenTelemetry layer is installed. Call it right
/// after creating the span, before entering it or creating children: a started span cannot change
/// its parent.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.map(str::trim).filter(|value| !value.is_empty()) else { return };
    if traceparent.len() > MAX_TRACEPARENT_LENGTH {
        tracing::debug!(length = traceparent.len(), "ignoring an oversized traceparent");
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if !context.span().span_context().is_valid() {
        tracing::debug!(traceparent, "ignoring an invalid traceparent");
        return;
    }
    match span.set_parent(context) {
        Ok(()) => {}
        // No exporter, or a span the trace filter drops: nothing to link.
        Err(SetParentError::LayerNotFound | SetParentError::SpanDisabled) => {}
        Err(error @ SetParentError::AlreadyStarted) => {
            tracing::debug!(%error, "cannot attach the remote trace context; set it before entering the span");
        }
    }
}
