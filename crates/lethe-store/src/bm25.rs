//! BM25 over chunks with tantivy, restricted to what the caller may read.
//!
//! Two things make label filtering here exact rather than approximate:
//!
//! * The label filter is a clause of the query (`Must(text)` and a zero-score
//!   `Must(label ∈ readable)`), so tantivy's top-k is the top-k among
//!   readable chunks, never a post-filtered list that comes back short.
//! * The BM25 *statistics* (document count, average length, document
//!   frequency of each term) are computed over the readable chunks only,
//!   through a custom [`Bm25StatisticsProvider`]. With tantivy's global
//!   statistics, scores and rankings would depend on how often a term occurs
//!   in documents the caller cannot see, a side channel that reveals their
//!   content. Here a caller gets exactly the scores an index holding only
//!   its readable chunks would give.

use std::path::Path;

use tantivy::collector::{Count, TopDocs};
use tantivy::query::{
    Bm25StatisticsProvider, BooleanQuery, ConstScoreQuery, Occur, Query, QueryParser, TermQuery,
    TermSetQuery,
};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, TextAnalyzer,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, Term};

use crate::{Error, Result};

const TOKENIZER: &str = "lethe_en";

/// The tantivy side of the store.
pub(crate) struct Bm25 {
    index: Index,
    writer: IndexWriter,
    reader: IndexReader,
    key: Field,
    doc: Field,
    label: Field,
    text: Field,
    parser: QueryParser,
    analyzer: TextAnalyzer,
}

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(Stemmer::new(Language::English))
        .build()
}

fn schema() -> Schema {
    let mut b = Schema::builder();
    b.add_u64_field("key", INDEXED | FAST);
    b.add_text_field("doc", STRING);
    b.add_u64_field("label", INDEXED | FAST);
    let indexing = TextFieldIndexing::default()
        .set_tokenizer(TOKENIZER)
        .set_index_option(IndexRecordOption::WithFreqsAndPositions);
    b.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(indexing),
    );
    b.build()
}

impl Bm25 {
    /// Opens the index in `dir` (creating it when absent) and returns it with
    /// the sequence number of its last commit.
    pub(crate) fn open(dir: &Path) -> Result<(Bm25, u64)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
        let index = if dir.join("meta.json").exists() {
            Index::open_in_dir(dir)?
        } else {
            Index::create_in_dir(dir, schema())?
        };
        let seq = match index.load_metas()?.payload {
            None => 0,
            Some(p) => p.parse().map_err(|_| {
                Error::DataCorruption(format!(
                    "BM25 index commit payload {p:?} is not a sequence number"
                ))
            })?,
        };
        Ok((Bm25::from_index(index)?, seq))
    }

    /// An in-memory index (reference indexes in tests).
    #[cfg(test)]
    pub(crate) fn in_ram() -> Result<Bm25> {
        Bm25::from_index(Index::create_in_ram(schema()))
    }

    fn from_index(index: Index) -> Result<Bm25> {
        index.tokenizers().register(TOKENIZER, analyzer());
        let s = index.schema();
        let field = |name: &str| {
            s.get_field(name)
                .map_err(|_| Error::IncompatibleFormat(format!("BM25 index has no field {name:?}")))
        };
        let (key, doc, label, text) = (
            field("key")?,
            field("doc")?,
            field("label")?,
            field("text")?,
        );
        let writer = index.writer_with_num_threads(1, 30_000_000)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let parser = QueryParser::for_index(&index, vec![text]);
        Ok(Bm25 {
            index,
            writer,
            reader,
            key,
            doc,
            label,
            text,
            parser,
            analyzer: analyzer(),
        })
    }

    /// How many tokens BM25 sees in `text` (its field length).
    pub(crate) fn count_tokens(&self, text: &str) -> u64 {
        let mut analyzer = self.analyzer.clone();
        let mut stream = analyzer.token_stream(text);
        let mut n = 0;
        while stream.advance() {
            n += 1;
        }
        n
    }

    pub(crate) fn add_chunk(&self, doc_id: &str, key: u64, label: u32, text: &str) -> Result<()> {
        let mut d = TantivyDocument::new();
        d.add_u64(self.key, key);
        d.add_text(self.doc, doc_id);
        d.add_u64(self.label, u64::from(label));
        d.add_text(self.text, text);
        self.writer.add_document(d)?;
        Ok(())
    }

    pub(crate) fn delete_doc(&self, doc_id: &str) {
        self.writer
            .delete_term(Term::from_field_text(self.doc, doc_id));
    }

    pub(crate) fn delete_all(&self) -> Result<()> {
        self.writer.delete_all_documents()?;
        Ok(())
    }

    /// Commits with `seq` as payload and makes the commit searchable.
    pub(crate) fn commit(&mut self, seq: u64) -> Result<()> {
        let mut prepared = self.writer.prepare_commit()?;
        prepared.set_payload(&seq.to_string());
        prepared.commit()?;
        self.reader.reload()?;
        Ok(())
    }

    /// Physically removes deleted chunks: merges every segment that has
    /// deletions and collects the old files. After this no file of the index
    /// holds a deleted chunk's terms.
    pub(crate) fn purge_deleted(&mut self) -> Result<()> {
        let ids: Vec<_> = self
            .index
            .searchable_segment_metas()?
            .into_iter()
            .filter(|m| m.has_deletes())
            .map(|m| m.id())
            .collect();
        if !ids.is_empty() {
            self.writer.merge(&ids).wait()?;
        }
        self.writer.garbage_collect_files().wait()?;
        self.reader.reload()?;
        Ok(())
    }

    /// Top `k` chunk keys by BM25 among chunks whose label is in `readable`
    /// (`None`: all), scored with statistics over exactly those chunks.
    pub(crate) fn search(
        &self,
        query: &str,
        k: usize,
        readable: Option<&[u32]>,
        stats: ReadableStats,
    ) -> Result<Vec<(u64, f32)>> {
        if k == 0 || stats.docs == 0 || readable.is_some_and(|r| r.is_empty()) {
            return Ok(Vec::new());
        }
        let searcher = self.reader.searcher();
        let (text_query, _errors) = self.parser.parse_query_lenient(query);
        let filter = readable.map(|ids| {
            let terms = ids
                .iter()
                .map(|&l| Term::from_field_u64(self.label, u64::from(l)));
            Box::new(TermSetQuery::new(terms)) as Box<dyn Query>
        });
        let query: Box<dyn Query> = match &filter {
            None => text_query,
            Some(f) => Box::new(BooleanQuery::new(vec![
                (Occur::Must, text_query),
                (
                    Occur::Must,
                    Box::new(ConstScoreQuery::new(f.box_clone(), 0.0)),
                ),
            ])),
        };
        let provider = Restricted {
            searcher: &searcher,
            filter: filter.as_deref(),
            stats,
        };
        let top = TopDocs::with_limit(k).order_by_score();
        let hits = searcher.search_with_statistics_provider(&query, &top, &provider)?;
        let mut out = Vec::with_capacity(hits.len());
        for (score, addr) in hits {
            let column = searcher
                .segment_reader(addr.segment_ord)
                .fast_fields()
                .u64("key")?;
            let key = column
                .first(addr.doc_id)
                .ok_or_else(|| Error::DataCorruption("BM25 chunk without a key".into()))?;
            out.push((key, score));
        }
        Ok(out)
    }

    /// Plain tantivy BM25 with the index's own statistics: the independent
    /// reference the restricted search is tested against.
    #[cfg(test)]
    pub(crate) fn search_with_index_statistics(
        &self,
        query: &str,
        k: usize,
    ) -> Result<Vec<(u64, f32)>> {
        let searcher = self.reader.searcher();
        let (q, _) = self.parser.parse_query_lenient(query);
        let hits = searcher.search(&q, &TopDocs::with_limit(k).order_by_score())?;
        hits.into_iter()
            .map(|(score, addr)| {
                let column = searcher
                    .segment_reader(addr.segment_ord)
                    .fast_fields()
                    .u64("key")?;
                Ok((column.first(addr.doc_id).unwrap_or(u64::MAX), score))
            })
            .collect()
    }

    /// Every live chunk as (key, label): for consistency checks.
    pub(crate) fn live_chunks(&self) -> Result<Vec<(u64, u32)>> {
        let searcher = self.reader.searcher();
        let mut out = Vec::new();
        for seg in searcher.segment_readers() {
            let keys = seg.fast_fields().u64("key")?;
            let labels = seg.fast_fields().u64("label")?;
            for doc in seg.doc_ids_alive() {
                let key = keys
                    .first(doc)
                    .ok_or_else(|| Error::DataCorruption("chunk without key".into()))?;
                let label = labels
                    .first(doc)
                    .ok_or_else(|| Error::DataCorruption("chunk without label".into()))?;
                out.push((key, label as u32));
            }
        }
        Ok(out)
    }
}

/// Size of the readable collection, from the store's own counters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadableStats {
    /// Readable chunks.
    pub docs: u64,
    /// Their total BM25 token count.
    pub tokens: u64,
}

struct Restricted<'a> {
    searcher: &'a Searcher,
    filter: Option<&'a dyn Query>,
    stats: ReadableStats,
}

impl Bm25StatisticsProvider for Restricted<'_> {
    fn total_num_tokens(&self, _field: Field) -> tantivy::Result<u64> {
        Ok(self.stats.tokens)
    }

    fn total_num_docs(&self) -> tantivy::Result<u64> {
        Ok(self.stats.docs)
    }

    fn doc_freq(&self, term: &Term) -> tantivy::Result<u64> {
        let term_query: Box<dyn Query> =
            Box::new(TermQuery::new(term.clone(), IndexRecordOption::Basic));
        let q: Box<dyn Query> = match self.filter {
            None => term_query,
            Some(f) => Box::new(BooleanQuery::new(vec![
                (Occur::Must, term_query),
                (Occur::Must, f.box_clone()),
            ])),
        };
        let n = self.searcher.search(&q, &Count)?;
        Ok(n as u64)
    }
}
