-- The demo target: the 33-column `person` table of seeds/001 (Teradata → PostgreSQL types).
-- `id` is the unique key (the seed's UNIQUE PRIMARY INDEX), `queue_time` is stamped by the
-- publisher and written by conveyor, `db_time` is filled by the database at insert.
-- Usage: psql -v ON_ERROR_STOP=1 -v schema=public -f deploy/sql/person.sql
CREATE TABLE IF NOT EXISTS person (
    id                 char(20) PRIMARY KEY,
    home_status        varchar(12),
    age                integer,
    gender             char(1),
    occupation         varchar(50),
    income             numeric(9,2),
    os                 varchar(15),
    last_update        date,
    marital_status     varchar(12),
    zip                char(10),
    education          varchar(24),
    prefix_description varchar(4),
    isp                varchar(100),
    fname              varchar(20),
    dma_lu             varchar(12),
    lname              varchar(20),
    browser            varchar(55),
    mname              varchar(20),
    creditnum          varchar(20),
    suffix_description varchar(4),
    creditexp          date,
    address1           varchar(40),
    work_status        varchar(12),
    credit_type        varchar(12),
    events             varchar(50),
    address2           varchar(40),
    city               varchar(20),
    telephone          char(14),
    email              varchar(55),
    state              varchar(20),
    country            varchar(20),
    queue_time         timestamp(6),
    db_time            timestamp(6) DEFAULT clock_timestamp()
);
