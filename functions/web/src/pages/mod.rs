//! The page's HTML, one module per kind of page; text from the API is escaped by maud.

pub mod exports;
pub mod layout;
pub mod views;
