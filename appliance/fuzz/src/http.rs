//! The HTTP front end's parsers on arbitrary bytes: a client's request head
//! ([`request::parse`]) and an origin's response head ([`response::parse`]).
//! The input is one or the other, chosen by its first byte. What must hold:
//! no panic; a head never longer than the input; a servable request read again
//! as its validation form (`HEAD`) is still servable, for the same path and
//! host, and no longer than one byte more; a response's framing and served body are
//! decided without panicking, and a served range lies inside the stated total.

use nearblock::splice::http::{request, response};

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        run_request(rest);
    } else {
        run_response(rest);
    }
}

fn run_request(data: &[u8]) {
    match request::parse(data) {
        request::Parsed::Servable(req) => {
            assert!(req.head_len <= data.len());
            let head = &data[..req.head_len];
            let as_head = request::as_head(head);
            assert!(as_head.len() <= head.len() + 1);
            match request::parse(&as_head) {
                request::Parsed::Servable(again) => {
                    assert_eq!(again.method, request::Method::Head);
                    assert_eq!(again.path, req.path);
                    assert_eq!(again.host, req.host);
                }
                other => panic!("the HEAD form of a servable request is {other:?}"),
            }
        }
        request::Parsed::Partial => assert!(data.len() < request::MAX_HEAD),
        request::Parsed::Pass(_) => {}
    }
}

fn run_response(data: &[u8]) {
    let Ok(Some(head)) = response::parse(data) else {
        return;
    };
    assert!(head.head_len <= data.len());
    let _ = head.framing(false);
    let _ = head.framing(true);
    if let Ok(body) = head.served_body() {
        assert!(body.range.start < body.range.end || body.range.is_empty());
        assert!(body.range.end <= body.total);
    }
}
