//! Parses a filter and a topic (split at the first newline) and checks that the
//! `SubscriptionTrie` agrees with `TopicFilter::matches`, and that a parsed filter's
//! `as_str()` re-parses to an equal filter. Must never panic.
#![no_main]

use daemoneye_eventbus_core::{SubscriptionTrie, Topic, TopicFilter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (filter_part, topic_part) = match input.split_once('\n') {
        Some((f, t)) => (f, Some(t)),
        None => (input, None),
    };

    let filter = TopicFilter::new(filter_part);
    let topic = topic_part.map(Topic::new);

    if let Ok(filter) = &filter {
        // The normalised form re-parses to the same filter (and is a fixed point).
        let reparsed = TopicFilter::new(filter.as_str()).unwrap_or_else(|e| {
            panic!("as_str() {:?} of a parsed filter does not re-parse: {e}", filter.as_str())
        });
        assert_eq!(filter, &reparsed, "re-parsed filter differs");
        assert_eq!(filter.as_str(), reparsed.as_str());
        assert!(!filter.as_str().contains('*'), "filter not normalised: {filter:?}");
    }

    // A valid topic is also a valid (wildcard-free) filter that matches itself.
    if let Some(Ok(topic)) = &topic {
        let as_filter = TopicFilter::from(topic.clone());
        assert!(!as_filter.has_wildcard());
        assert_eq!(TopicFilter::new(topic.as_str()).as_ref(), Ok(&as_filter));
        assert!(as_filter.matches(topic), "topic {topic:?} does not match itself");
    }

    let (Ok(filter), Some(Ok(topic))) = (filter, topic) else {
        return;
    };

    let expected = filter.matches(&topic);

    let mut trie = SubscriptionTrie::<u32>::new();
    assert!(trie.insert(&filter, 7));
    assert!(!trie.insert(&filter, 7), "duplicate insert accepted");

    let mut out = Vec::new();
    trie.matches_into(&topic, &mut out);
    let mut calls = 0usize;
    trie.for_each_match(&topic, |_| calls += 1);
    if expected {
        assert_eq!(out, [7], "trie missed {filter:?} for {topic:?}");
        assert_eq!(calls, 1, "for_each_match called {calls} times");
    } else {
        assert!(out.is_empty(), "trie matched {filter:?} for {topic:?}; matches() says no");
        assert_eq!(calls, 0);
    }

    // Removing the only subscription prunes the trie back to empty.
    assert!(trie.remove(&filter, 7));
    assert!(!trie.remove(&filter, 7));
    assert!(trie.is_empty());
    trie.matches_into(&topic, &mut out);
    assert!(out.is_empty(), "removed filter still matches");
});
