//! What a handler gets from the route table: the path parameter, the query, the headers and the
//! body (already read within the body limit). Must not: carry anything but the request.

use bytes::Bytes;
use warp::http::HeaderMap;

/// What a handler gets: the path parameter (if its template has one), query, headers, body.
pub struct Request {
    pub param: Option<String>,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Request {
    /// A header's value, if present and ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}
