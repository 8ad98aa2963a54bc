//! A client's h2 request body on its way to an upstream over hyper's
//! client, reporting when it has been sent whole.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use http_body::Body as _;
use hyper::body::Incoming;

/// A client's request body on its way upstream. It reports when it has
/// been sent completely, because the upstream's response timeout only
/// starts then: a slow upload is not a silent upstream.
///
/// Most requests have no body at all: they get no signal (and no
/// allocation); [`uploaded`](Self::uploaded) is then ready at once.
pub struct UploadBody {
    inner: Incoming,
    done: Option<Arc<UploadSignal>>,
}

/// Set once a body has been sent (or dropped); wakes the one waiter.
#[derive(Default)]
struct UploadSignal {
    done: AtomicBool,
    waker: AtomicWaker,
}

impl UploadSignal {
    fn set(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

impl UploadBody {
    pub fn new(inner: Incoming) -> Self {
        let done = (!inner.is_end_stream()).then(Arc::default);
        UploadBody { inner, done }
    }

    /// Resolves once the body is sent, or is dropped.
    pub fn uploaded(&self) -> Uploaded {
        Uploaded(self.done.clone())
    }

    fn set_done(&self) {
        if let Some(d) = &self.done {
            d.set();
        }
    }
}

impl Drop for UploadBody {
    fn drop(&mut self) {
        self.set_done();
    }
}

/// See [`UploadBody::uploaded`].
pub struct Uploaded(Option<Arc<UploadSignal>>);

impl Future for Uploaded {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(signal) = &self.0 else {
            return Poll::Ready(());
        };
        if signal.done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        signal.waker.register(cx.waker());
        if signal.done.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl http_body::Body for UploadBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            self.set_done();
        } else if let Poll::Ready(Some(Ok(_))) = polled {
            if self.inner.is_end_stream() {
                self.set_done();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
